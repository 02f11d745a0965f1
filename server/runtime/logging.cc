#include "server/runtime/logging.h"

#include <grpc/support/log.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "lib/common/safe_text.h"
#include "spdlog/formatter.h"
#include "spdlog/pattern_formatter.h"
#include "spdlog/sinks/stdout_sinks.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

void AppendJsonString(std::string_view in, spdlog::memory_buf_t& out) {
  out.push_back('"');
  for (char c : in) {
    switch (c) {
      case '"': out.append(std::string_view("\\\"")); break;
      case '\\': out.append(std::string_view("\\\\")); break;
      case '\n': out.append(std::string_view("\\n")); break;
      case '\r': out.append(std::string_view("\\r")); break;
      case '\t': out.append(std::string_view("\\t")); break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          std::string esc = absl::StrFormat("\\u%04x", static_cast<int>(c));
          out.append(std::string_view(esc));
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}

// Text lines: the pattern, with the message made safe first (control characters escaped, tokens
// redacted): a message may carry text from outside (an upstream's error, a caller's report), and a
// newline in it must not forge a line of its own (docs/ARCHITECTURE.md §8). Lines that need nothing are not copied.
class SafeTextFormatter final : public spdlog::formatter {
 public:
  explicit SafeTextFormatter(std::string pattern)
      : pattern_(std::move(pattern)), inner_(std::make_unique<spdlog::pattern_formatter>(pattern_)) {}

  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    // Debian's Abseil has its own string_view, not std's.
    absl::string_view payload(msg.payload.data(), msg.payload.size());
    if (!NeedsSafeText(payload)) {
      inner_->format(msg, dest);
      return;
    }
    const std::string safe = SafeText(payload, payload.size());
    spdlog::details::log_msg copy = msg;
    copy.payload = spdlog::string_view_t(safe.data(), safe.size());
    inner_->format(copy, dest);
  }
  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<SafeTextFormatter>(pattern_); }

 private:
  const std::string pattern_;
  std::unique_ptr<spdlog::pattern_formatter> inner_;
};

// One JSON object per line: {"time":"...","level":"info","msg":"..."}. The message's control
// characters are escaped by the JSON encoding; token-shaped strings are redacted.
class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    std::string time = absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromChrono(msg.time),
                                        absl::UTCTimeZone());
    dest.append(std::string_view("{\"time\":\""));
    dest.append(std::string_view(time));
    dest.append(std::string_view("\",\"level\":\""));
    auto level = spdlog::level::to_string_view(msg.level);
    dest.append(std::string_view(level.data(), level.size()));
    dest.append(std::string_view("\",\"msg\":"));
    absl::string_view payload(msg.payload.data(), msg.payload.size());
    if (NeedsSafeText(payload)) {
      AppendJsonString(RedactTokens(payload), dest);
    } else {
      AppendJsonString(std::string_view(payload.data(), payload.size()), dest);
    }
    dest.append(std::string_view("}\n"));
  }
  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<JsonFormatter>(); }
};

// gRPC core writes its own lines to stderr (errors as raw JSON, which also breaks --log_format=json):
// they go through our logger instead, errors as warnings, the rest at debug.
void GrpcLog(gpr_log_func_args* args) {
  if (args->severity == GPR_LOG_SEVERITY_ERROR) {
    spdlog::warn("grpc: {}", args->message);
  } else {
    spdlog::debug("grpc {}:{}: {}", args->file, args->line, args->message);
  }
}

}  // namespace

absl::Status SetUpLogging(const std::string& format, const std::string& level) {
  spdlog::level::level_enum lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--log_level: unknown level '", level, "'; use trace, debug, info, warn, error or off"));
  }
  if (format != "text" && format != "json") {
    return absl::InvalidArgumentError(
        absl::StrCat("--log_format: unknown format '", format, "'; use text or json"));
  }
  auto logger = std::make_shared<spdlog::logger>("tokenbroker",
                                                 std::make_shared<spdlog::sinks::stderr_sink_mt>());
  if (format == "json") {
    logger->set_formatter(std::make_unique<JsonFormatter>());
  } else {
    logger->set_formatter(std::make_unique<SafeTextFormatter>("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v"));
  }
  logger->set_level(lvl);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(std::move(logger));
  gpr_set_log_function(GrpcLog);
  return absl::OkStatus();
}

}  // namespace tokenbroker
