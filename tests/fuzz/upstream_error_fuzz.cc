// libFuzzer target for the upstream error parser: any bytes as HTTP status, Retry-After and body
// must give an answer — no crash, no sanitizer report, and never a negative or absurd delay. The
// body also goes through the Cloud Code answer parsers (loadCodeAssist, quota, onboardUser's
// operation): fractions stay in [0, 1], and an operation that succeeded names a project.
#include <cstddef>
#include <cstdint>
#include <string>

#include "lib/common/upstream_error.h"
#include "lib/upstream/cloud_code_client.h"

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
  (void)tokenbroker::ParseLoadCodeAssist(body);
  auto fraction_ok = [](double f) { return f >= 0 && f <= 1; };
  if (auto models = tokenbroker::ParseAvailableModels(body); models.ok()) {
    for (const auto& m : *models) if (!fraction_ok(m.remaining_fraction)) __builtin_trap();
  }
  if (auto models = tokenbroker::ParseUserQuota(body); models.ok()) {
    if (models->size() > 64) __builtin_trap();
    for (const auto& m : *models) if (!fraction_ok(m.remaining_fraction) || m.model.empty()) __builtin_trap();
  }
  if (auto buckets = tokenbroker::ParseQuotaSummary(body); buckets.ok()) {
    for (const auto& b : *buckets) if (!fraction_ok(b.remaining_fraction)) __builtin_trap();
  }
  if (auto op = tokenbroker::ParseOnboardOperation(body); op.ok()) {
    if (op->done && op->error.empty() && op->project_id.empty()) __builtin_trap();
    if (!op->done && op->name.empty()) __builtin_trap();
    if (op->name.find("..") != std::string::npos) __builtin_trap();
  }
  return 0;
}
