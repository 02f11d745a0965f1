#include "lib/common/upstream_error.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "lib/common/safe_text.h"
#include "nlohmann/json.hpp"

namespace tokenbroker {
namespace {

using Json = nlohmann::json;

constexpr absl::string_view kCreditsReason = "INSUFFICIENT_G1_CREDITS_BALANCE";

struct Candidate {
  absl::Duration delay;
  std::string source;
  bool clamped = false;
};

// Unit of a duration component, by its spelling.
std::optional<absl::Duration> UnitOf(absl::string_view unit) {
  static const std::pair<absl::string_view, absl::Duration> kUnits[] = {
      {"h", absl::Hours(1)},          {"hr", absl::Hours(1)},         {"hrs", absl::Hours(1)},
      {"hour", absl::Hours(1)},       {"hours", absl::Hours(1)},      {"m", absl::Minutes(1)},
      {"min", absl::Minutes(1)},      {"mins", absl::Minutes(1)},     {"minute", absl::Minutes(1)},
      {"minutes", absl::Minutes(1)},  {"s", absl::Seconds(1)},        {"sec", absl::Seconds(1)},
      {"secs", absl::Seconds(1)},     {"second", absl::Seconds(1)},   {"seconds", absl::Seconds(1)},
      {"ms", absl::Milliseconds(1)},  {"us", absl::Microseconds(1)},  {"\xC2\xB5s", absl::Microseconds(1)},
      {"ns", absl::Nanoseconds(1)},   {"d", absl::Hours(24)},         {"day", absl::Hours(24)},
      {"days", absl::Hours(24)},
  };
  for (const auto& [name, d] : kUnits) {
    if (unit == name) return d;
  }
  return std::nullopt;
}

// A duration from a value that may be a string ("3.5s"), a number of seconds, or an object
// {"seconds": 34, "nanos": 500000000}. `clamped` is set for negative values.
std::optional<absl::Duration> DurationFromJson(const Json& v, bool* negative) {
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    if (absl::StartsWith(absl::StripAsciiWhitespace(s), "-")) {
      *negative = true;
      return absl::ZeroDuration();
    }
    return ParseUpstreamDuration(s);
  }
  if (v.is_number()) {
    double secs = v.get<double>();
    if (!std::isfinite(secs)) return std::nullopt;
    if (secs < 0) {
      *negative = true;
      return absl::ZeroDuration();
    }
    return absl::Seconds(std::min(secs, 1e12));
  }
  if (v.is_object()) {
    double secs = 0;
    double nanos = 0;
    bool any = false;
    if (auto it = v.find("seconds"); it != v.end()) {
      if (it->is_number()) {
        secs = it->get<double>();
        any = true;
      } else if (it->is_string() && absl::SimpleAtod(it->get<std::string>(), &secs)) {
        any = true;
      }
    }
    if (auto it = v.find("nanos"); it != v.end() && it->is_number()) {
      nanos = it->get<double>();
      any = true;
    }
    if (!any || !std::isfinite(secs) || !std::isfinite(nanos)) return std::nullopt;
    double total = secs + nanos / 1e9;
    if (total < 0) {
      *negative = true;
      return absl::ZeroDuration();
    }
    return absl::Seconds(std::min(total, 1e12));
  }
  return std::nullopt;
}

std::string TypeName(const Json& detail) {
  auto it = detail.find("@type");
  if (it == detail.end() || !it->is_string()) return "";
  std::string t = it->get<std::string>();
  size_t slash = t.rfind('/');
  return slash == std::string::npos ? t : t.substr(slash + 1);
}

std::string StringAt(const Json& obj, const char* key) {
  if (!obj.is_object()) return "";
  auto it = obj.find(key);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : "";
}

// Looks for the text forms of a delay in a human message.
std::optional<absl::Duration> DelayInText(absl::string_view text) {
  static constexpr absl::string_view kPhrases[] = {
      "reset after ", "resets after ", "retry after ", "try again in ", "try again after ",
      "please wait ", "retry in ", "wait for ", "available in ", "resets in ", "reset in ",
  };
  const std::string lower = absl::AsciiStrToLower(text.substr(0, 8192));
  for (absl::string_view phrase : kPhrases) {
    size_t pos = lower.find(phrase.data(), 0, phrase.size());
    while (pos != std::string::npos) {
      absl::string_view rest = absl::string_view(lower).substr(pos + phrase.size(), 64);
      std::vector<absl::string_view> words = absl::StrSplit(rest, ' ', absl::SkipEmpty());
      for (size_t k = std::min<size_t>(words.size(), 3); k >= 1; --k) {
        std::string candidate;
        for (size_t i = 0; i < k; ++i) absl::StrAppend(&candidate, i ? " " : "", words[i]);
        while (!candidate.empty() && absl::string_view(".,;:)\"'!").find(candidate.back()) != absl::string_view::npos) {
          candidate.pop_back();
        }
        if (std::optional<absl::Duration> d = ParseUpstreamDuration(candidate)) return d;
      }
      pos = lower.find(phrase.data(), pos + 1, phrase.size());
    }
  }
  return std::nullopt;
}

// `past` is set when the header is an HTTP date that has already gone by: it names no delay.
std::optional<absl::Duration> RetryAfterHeader(absl::string_view value, absl::Time now, bool* negative, bool* past) {
  value = absl::StripAsciiWhitespace(value);
  if (value.empty()) return std::nullopt;
  double secs = 0;
  if (absl::SimpleAtod(value, &secs) && std::isfinite(secs)) {
    if (secs < 0) {
      *negative = true;
      return absl::ZeroDuration();
    }
    return absl::Seconds(std::min(secs, 1e12));
  }
  // HTTP date, e.g. "Sun, 29 Nov 2026 01:12:30 GMT" (RFC 9110 IMF-fixdate).
  absl::Time t;
  std::string err;
  std::string text(value);
  if (absl::ParseTime("%a, %d %b %Y %H:%M:%S GMT", text, absl::UTCTimeZone(), &t, &err) ||
      absl::ParseTime("%d %b %Y %H:%M:%S GMT", text, absl::UTCTimeZone(), &t, &err)) {
    if (t <= now) {
      *past = true;
      return std::nullopt;
    }
    return t - now;
  }
  return std::nullopt;
}

}  // namespace

absl::string_view FailureKindName(FailureKind kind) {
  switch (kind) {
    case FailureKind::kSuccess: return "success";
    case FailureKind::kQuotaExhausted: return "quota exhausted";
    case FailureKind::kRateLimited: return "rate limited";
    case FailureKind::kCapacityExhausted: return "model capacity exhausted";
    case FailureKind::kUnauthorized: return "unauthorized";
    case FailureKind::kValidationRequired: return "validation required";
    case FailureKind::kSuspended: return "suspended (Terms of Service)";
    case FailureKind::kForbidden: return "forbidden";
    case FailureKind::kInvalidGrant: return "invalid_grant";
    case FailureKind::kServerError: return "server error";
    case FailureKind::kClientError: return "client error";
  }
  return "unknown";
}

std::optional<absl::Duration> ParseUpstreamDuration(absl::string_view text) {
  text = absl::StripAsciiWhitespace(text);
  text = absl::StripPrefix(absl::StripSuffix(text, "\""), "\"");
  if (text.empty() || text.size() > 64) return std::nullopt;
  // A bare number is seconds; only digits and one dot (no sign, exponent, inf or nan).
  if (text.find_first_not_of("0123456789.") == absl::string_view::npos &&
      std::count(text.begin(), text.end(), '.') <= 1 && text != ".") {
    double plain = 0;
    if (!absl::SimpleAtod(text, &plain) || !std::isfinite(plain)) return std::nullopt;
    return absl::Seconds(std::min(plain, 1e12));
  }
  absl::Duration total = absl::ZeroDuration();
  size_t i = 0;
  int components = 0;
  while (i < text.size()) {
    while (i < text.size() && text[i] == ' ') ++i;
    if (i >= text.size()) break;
    size_t start = i;
    bool dot = false;
    while (i < text.size() && (absl::ascii_isdigit(static_cast<unsigned char>(text[i])) || (text[i] == '.' && !dot))) {
      dot |= text[i] == '.';
      ++i;
    }
    if (i == start || (i - start == 1 && dot)) return std::nullopt;
    double value = 0;
    if (!absl::SimpleAtod(text.substr(start, i - start), &value)) return std::nullopt;
    while (i < text.size() && text[i] == ' ') ++i;
    size_t unit_start = i;
    while (i < text.size() && !absl::ascii_isdigit(static_cast<unsigned char>(text[i])) && text[i] != ' ' &&
           text[i] != '.') {
      ++i;
    }
    std::optional<absl::Duration> unit =
        UnitOf(absl::AsciiStrToLower(text.substr(unit_start, i - unit_start)));
    if (!unit) return std::nullopt;
    total += *unit * std::min(value, 1e12);
    ++components;
    while (i < text.size() && (text[i] == ' ' || text[i] == ',')) ++i;
    if (absl::StartsWith(text.substr(i), "and ")) i += 4;
  }
  if (components == 0) return std::nullopt;
  return total;
}

UpstreamError ParseUpstreamError(int http_status, absl::string_view retry_after, absl::string_view body,
                                 absl::Time now) {
  UpstreamError out;
  std::vector<Candidate> delays;
  bool negative = false;
  auto add = [&](std::optional<absl::Duration> d, const char* source) {
    if (d) delays.push_back({*d, source, negative});
    negative = false;
  };

  bool retry_after_past = false;
  add(RetryAfterHeader(retry_after, now, &negative, &retry_after_past), "Retry-After");
  if (retry_after_past) out.note = "the Retry-After date is in the past, so it names no delay";

  // Google errors are {"error": {...}}; some endpoints wrap them in an array.
  Json doc = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (!doc.is_discarded() && doc.is_array() && !doc.empty()) doc = doc[0];
  std::string message;
  bool invalid_grant = false;
  bool credits = false;  // an ErrorInfo.reason said INSUFFICIENT_G1_CREDITS_BALANCE
  if (!doc.is_discarded() && doc.is_object()) {
    auto err = doc.find("error");
    if (err != doc.end() && err->is_string()) {
      // OAuth-style {"error": "invalid_grant", "error_description": "..."}: only the token
      // endpoint's own answer shape, with its status (400, or 401 from some proxies), counts.
      invalid_grant = err->get<std::string>() == "invalid_grant" && (http_status == 400 || http_status == 401);
      message = StringAt(doc, "error_description");
    } else if (err != doc.end() && err->is_object()) {
      message = StringAt(*err, "message");
      if (auto details = err->find("details"); details != err->end() && details->is_array()) {
        for (const Json& d : *details) {
          if (!d.is_object()) continue;
          const std::string type = TypeName(d);
          if (type == "google.rpc.RetryInfo") {
            if (auto rd = d.find("retryDelay"); rd != d.end()) add(DurationFromJson(*rd, &negative), "RetryInfo");
          } else if (type == "google.rpc.ErrorInfo") {
            if (out.reason.empty()) out.reason = StringAt(d, "reason");
            credits |= StringAt(d, "reason") == kCreditsReason;
            if (auto md = d.find("metadata"); md != d.end() && md->is_object()) {
              if (auto q = md->find("quotaResetDelay"); q != md->end()) {
                add(DurationFromJson(*q, &negative), "quotaResetDelay");
              }
              std::string stamp = StringAt(*md, "quotaResetTimeStamp");
              absl::Time t;
              std::string perr;
              if (!stamp.empty() && absl::ParseTime(absl::RFC3339_full, stamp, &t, &perr)) {
                // A reset time that has gone by names no delay (a zero one would mean "no cooldown").
                if (t > now) add(t - now, "quotaResetTimeStamp");
              }
              if (out.model.empty()) out.model = StringAt(*md, "model");
              if (out.validation_url.empty()) out.validation_url = StringAt(*md, "validation_url");
              if (out.validation_url.empty()) out.validation_url = StringAt(*md, "validationUrl");
            }
          } else if (type == "google.rpc.QuotaFailure") {
            if (auto v = d.find("violations"); v != d.end() && v->is_array()) {
              for (const Json& viol : *v) {
                std::string id = StringAt(viol, "quotaId");
                if (!id.empty() && out.quota_id.empty()) out.quota_id = id;
              }
            }
          } else if (type == "google.rpc.Help") {
            if (auto links = d.find("links"); links != d.end() && links->is_array() && !links->empty()) {
              if (out.validation_url.empty()) out.validation_url = StringAt((*links)[0], "url");
            }
          }
        }
      }
      if (out.validation_url.empty()) out.validation_url = StringAt(*err, "validation_url");
    }
  } else {
    message = std::string(body.substr(0, 8192));
  }
  add(DelayInText(message), "message");

  const std::string lower_message = absl::AsciiStrToLower(message);
  if (out.validation_url.empty() && (out.reason == "VALIDATION_REQUIRED" ||
                                     absl::StrContains(lower_message, "verify your account"))) {
    size_t p = message.find("https://");
    if (p != std::string::npos) {
      size_t end = message.find_first_of(" \"'<>)\n\r\t", p);
      out.validation_url = message.substr(p, end == std::string::npos ? std::string::npos : end - p);
      while (!out.validation_url.empty() && (out.validation_url.back() == '.' || out.validation_url.back() == ',')) {
        out.validation_url.pop_back();
      }
    }
  }

  // What kind of failure it is.
  out.credits_exhausted = (http_status == 429 || http_status == 403) &&
                          (credits || absl::StrContains(message, kCreditsReason));
  if (http_status >= 200 && http_status < 300) {
    out.kind = FailureKind::kSuccess;
  } else if (out.credits_exhausted) {
    // The request drew on credits there are none of; the account itself is fine (no cooldown).
    out.kind = FailureKind::kClientError;
  } else if (invalid_grant) {
    out.kind = FailureKind::kInvalidGrant;
  } else if (out.reason == "MODEL_CAPACITY_EXHAUSTED") {
    out.kind = FailureKind::kCapacityExhausted;
  } else if (out.reason == "VALIDATION_REQUIRED" ||
             (http_status == 403 && (absl::StrContains(lower_message, "verify your account") ||
                                     absl::StrContains(lower_message, "validation_required")))) {
    out.kind = FailureKind::kValidationRequired;
  } else if (http_status == 401) {
    out.kind = FailureKind::kUnauthorized;
  } else if (http_status == 403 && (absl::StrContains(lower_message, "terms of service") ||
                                    absl::StrContains(lower_message, "has been disabled in this account") ||
                                    out.reason == "TOS_VIOLATION" || out.reason == "ACCOUNT_SUSPENDED")) {
    out.kind = FailureKind::kSuspended;
    out.message = SafeText(message, 2 * kMaxUpstreamField);
  } else if (http_status == 403) {
    out.kind = FailureKind::kForbidden;
  } else if (http_status == 429) {
    if (out.reason == "QUOTA_EXHAUSTED" || absl::StrContains(out.quota_id, "PerDay") ||
        absl::StrContains(lower_message, "exhausted your capacity") ||
        absl::StrContains(lower_message, "quota will reset") || absl::StrContains(lower_message, "quota reached")) {
      out.kind = FailureKind::kQuotaExhausted;
      // Google names family-wide limits in words ("Individual quota reached for claude models"),
      // and weekly ones in the quota id or the message.
      out.family_wide = (absl::StrContains(lower_message, "quota reached for") &&
                         absl::StrContains(lower_message, " models")) ||
                        absl::StrContains(lower_message, "weekly") ||
                        absl::StrContains(absl::AsciiStrToLower(out.quota_id), "weekly");
    } else {
      out.kind = FailureKind::kRateLimited;
    }
  } else if (http_status >= 500) {
    out.kind = FailureKind::kServerError;
  } else {
    out.kind = FailureKind::kClientError;
  }

  // The longest delay any form named; clamp what is negative or absurd.
  for (const Candidate& c : delays) {
    if (!out.delay || c.delay > *out.delay) {
      out.delay = c.delay;
      out.delay_source = c.source;
      out.delay_clamped = c.clamped;
    }
  }
  if (out.delay && *out.delay > kMaxUpstreamDelay) {
    out.delay = kMaxUpstreamDelay;
    out.delay_clamped = true;
  }
  // Everything kept from the body is the upstream's (or a caller's) text: it goes to logs, to
  // callers and to operators only escaped, redacted and bounded.
  out.reason = SafeText(out.reason, kMaxUpstreamField);
  out.quota_id = SafeText(out.quota_id, kMaxUpstreamField);
  out.model = SafeText(out.model, kMaxUpstreamField);
  out.validation_url = SafeText(out.validation_url, 2 * kMaxUpstreamField);
  return out;
}

std::string UpstreamError::Summary() const {
  std::string s(FailureKindName(kind));
  if (!reason.empty()) absl::StrAppend(&s, " (", reason, ")");
  if (credits_exhausted) absl::StrAppend(&s, ", AI credits exhausted (normal quota unaffected)");
  if (!quota_id.empty()) absl::StrAppend(&s, ", quota ", quota_id);
  if (family_wide) absl::StrAppend(&s, ", family-wide");
  if (delay) {
    absl::StrAppend(&s, ", upstream delay ", absl::FormatDuration(*delay), " from ", delay_source);
    if (delay_clamped) absl::StrAppend(&s, " (clamped: the upstream's value was out of range)");
  }
  if (!note.empty()) absl::StrAppend(&s, "; ", note);
  return s;
}

}  // namespace tokenbroker
