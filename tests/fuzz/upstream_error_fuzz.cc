// libFuzzer target for the upstream error parser: any bytes as HTTP status, Retry-After and body
// must give an answer — no crash, no sanitizer report, and never a negative or absurd delay.
#include <cstddef>
#include <cstdint>
#include <string>

#include "lib/common/upstream_error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const int status = 100 + (data[0] | (data[1] << 8)) % 500;
  const size_t header_len = std::min<size_t>(data[2], size - 3);
  const std::string retry_after(reinterpret_cast<const char*>(data + 3), header_len);
  const std::string body(reinterpret_cast<const char*>(data + 3 + header_len), size - 3 - header_len);
  const absl::Time now = absl::FromUnixSeconds(1795914000);

  tokenbroker::UpstreamError e = tokenbroker::ParseUpstreamError(status, retry_after, body, now);
  if (e.delay && (*e.delay < absl::ZeroDuration() || *e.delay > tokenbroker::kMaxUpstreamDelay)) __builtin_trap();
  (void)e.Summary();
  if (std::optional<absl::Duration> d = tokenbroker::ParseUpstreamDuration(body)) {
    if (*d < absl::ZeroDuration()) __builtin_trap();
  }
  return 0;
}
