#include "lib/upstream/cloud_code_client.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/common/safe_text.h"
#include "lib/common/upstream_error.h"
#include "nlohmann/json.hpp"

namespace tokenbroker {
namespace {

using Json = nlohmann::json;

std::string StringAt(const Json& obj, const char* key) {
  if (!obj.is_object()) return "";
  auto it = obj.find(key);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : "";
}

std::optional<absl::Time> TimeAt(const Json& obj, const char* key) {
  absl::Time t;
  std::string err;
  const std::string text = StringAt(obj, key);
  if (text.empty() || !absl::ParseTime(absl::RFC3339_full, text, &t, &err)) return std::nullopt;
  return t;
}

// An operation name goes into a URL path: only what Google's names are made of.
bool SafeOperationName(absl::string_view name) {
  if (name.empty() || name.size() > 256 || absl::StrContains(name, "..") || name.front() == '/') return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '/' || c == '_' || c == '.' || c == '-';
  });
}

constexpr char kRetryDelayPayload[] = "tokenbroker/retry-delay-ms";
constexpr char kSuspendedPayload[] = "tokenbroker/suspended";

absl::Status StatusForHttp(long status, const std::string& method) {
  std::string what = absl::StrCat("Cloud Code ", method, " answered HTTP ", status);
  if (status == 401) return absl::UnauthenticatedError(what);
  if (status == 403) return absl::PermissionDeniedError(what);
  if (status == 429) return absl::ResourceExhaustedError(what);
  if (status == 404) return absl::NotFoundError(what);
  if (status >= 500) return absl::UnavailableError(what);
  return absl::InternalError(what);
}

// StatusForHttp, carrying the delay the answer asked for (Retry-After, RetryInfo, ...) if any.
absl::Status StatusForResponse(const HttpResponse& resp, const std::string& method, absl::Time now) {
  absl::Status s = StatusForHttp(resp.status, method);
  UpstreamError parsed = ParseUpstreamError(static_cast<int>(resp.status), resp.retry_after, resp.body, now);
  if (parsed.delay) s.SetPayload(kRetryDelayPayload, absl::Cord(absl::StrCat(absl::ToInt64Milliseconds(*parsed.delay))));
  if (parsed.kind == FailureKind::kSuspended) s.SetPayload(kSuspendedPayload, absl::Cord(parsed.message));
  return s;
}

}  // namespace

std::optional<std::string> SuspensionOf(const absl::Status& status) {
  const auto payload = status.GetPayload(kSuspendedPayload);
  if (!payload) return std::nullopt;
  return std::string(*payload);
}

std::optional<absl::Duration> RetryDelayOf(const absl::Status& status) {
  const auto payload = status.GetPayload(kRetryDelayPayload);
  int64_t ms = 0;
  if (!payload || !absl::SimpleAtoi(std::string(*payload), &ms) || ms < 0) return std::nullopt;
  return absl::Milliseconds(ms);
}

absl::StatusOr<CodeAssistInfo> ParseLoadCodeAssist(absl::string_view body) {
  Json doc = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError("loadCodeAssist answer is not a JSON object");
  }
  CodeAssistInfo info;
  if (auto p = doc.find("cloudaicompanionProject"); p != doc.end()) {
    if (p->is_string()) {
      info.project_id = p->get<std::string>();
    } else if (p->is_object()) {
      info.project_id = StringAt(*p, "id");
    }
  }
  if (auto allowed = doc.find("allowedTiers"); allowed != doc.end() && allowed->is_array()) {
    for (const Json& t : *allowed) {
      const std::string id = StringAt(t, "id");
      if (id.empty()) continue;
      if (info.default_tier_id.empty()) info.default_tier_id = id;
      if (auto d = t.find("isDefault"); d != t.end() && d->is_boolean() && d->get<bool>()) {
        info.default_tier_id = id;
        break;
      }
    }
  }
  if (info.default_tier_id.empty()) {
    if (auto bad = doc.find("ineligibleTiers"); bad != doc.end() && bad->is_array() && !bad->empty()) {
      const Json& first = bad->front();
      std::string why = StringAt(first, "tierId");
      for (const char* key : {"reasonCode", "reasonMessage"}) {
        if (std::string part = StringAt(first, key); !part.empty()) absl::StrAppend(&why, why.empty() ? "" : ": ", part);
      }
      info.ineligible = SafeText(why.empty() ? "no tier allowed" : why, 2 * kMaxUpstreamField);
    }
  }
  const Json* tier = nullptr;
  if (auto paid = doc.find("paidTier"); paid != doc.end() && paid->is_object()) tier = &*paid;
  if (tier == nullptr) {
    if (auto cur = doc.find("currentTier"); cur != doc.end() && cur->is_object()) tier = &*cur;
  }
  if (tier != nullptr) {
    info.tier = ParseTier(StringAt(*tier, "id"));
    if (info.tier == Tier::kFree || info.tier == Tier::kUnknown) {
      Tier by_name = ParseTier(StringAt(*tier, "name"));
      if (by_name > info.tier) info.tier = by_name;
    }
  }
  return info;
}

absl::StatusOr<std::vector<ModelQuotaInfo>> ParseAvailableModels(absl::string_view body) {
  Json doc = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError("fetchAvailableModels answer is not a JSON object");
  }
  std::vector<ModelQuotaInfo> out;
  auto models = doc.find("models");
  if (models == doc.end() || models->is_null()) return out;
  if (!models->is_object()) return absl::InvalidArgumentError("fetchAvailableModels: 'models' is not an object");
  for (const auto& [name, m] : models->items()) {
    ModelQuotaInfo info;
    info.model = name;
    if (m.is_object()) {
      if (auto qi = m.find("quotaInfo"); qi != m.end() && qi->is_object()) {
        if (auto f = qi->find("remainingFraction"); f != qi->end() && f->is_number()) {
          info.remaining_fraction = std::clamp(f->get<double>(), 0.0, 1.0);
        }
        std::string reset = StringAt(*qi, "resetTime");
        absl::Time t;
        std::string err;
        if (!reset.empty() && absl::ParseTime(absl::RFC3339_full, reset, &t, &err)) info.reset_time = t;
      }
    }
    out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(), [](const ModelQuotaInfo& a, const ModelQuotaInfo& b) { return a.model < b.model; });
  return out;
}

CloudCodeClient::CloudCodeClient(std::vector<std::string> base_urls, const HttpClient& http, absl::Duration timeout,
                                 const Clock& clock)
    : base_urls_(std::move(base_urls)), http_(http), timeout_(timeout), clock_(clock) {}

CloudCodeClient CloudCodeClient::Via(EgressRoute egress) const {
  CloudCodeClient via(*this);
  via.egress_ = std::move(egress);
  return via;
}

absl::StatusOr<std::vector<QuotaBucketInfo>> ParseQuotaSummary(absl::string_view body) {
  constexpr size_t kMaxBuckets = 32;
  Json doc = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError("retrieveUserQuotaSummary answer is not a JSON object");
  }
  const Json* root = &doc;
  if (auto nested = doc.find("quotaSummary"); nested != doc.end() && nested->is_object()) root = &*nested;
  std::vector<QuotaBucketInfo> out;
  auto groups = root->find("groups");
  if (groups == root->end() || groups->is_null()) return out;
  if (!groups->is_array()) return absl::InvalidArgumentError("retrieveUserQuotaSummary: 'groups' is not an array");
  for (const Json& g : *groups) {
    if (!g.is_object()) continue;
    auto buckets = g.find("buckets");
    if (buckets == g.end() || !buckets->is_array()) continue;
    for (const Json& b : *buckets) {
      QuotaBucketInfo info;
      info.group = StringAt(g, "groupId");
      info.bucket = StringAt(b, "bucketId");
      if (info.bucket.empty() || out.size() >= kMaxBuckets) continue;
      info.window = StringAt(b, "window");
      if (auto f = b.find("remainingFraction"); f != b.end() && f->is_number()) {
        info.remaining_fraction = std::clamp(f->get<double>(), 0.0, 1.0);
      }
      absl::Time t;
      std::string err;
      if (std::string reset = StringAt(b, "resetTime"); !reset.empty() && absl::ParseTime(absl::RFC3339_full, reset, &t, &err)) {
        info.reset_time = t;
      }
      out.push_back(std::move(info));
    }
  }
  return out;
}

absl::StatusOr<std::vector<ModelQuotaInfo>> ParseUserQuota(absl::string_view body) {
  constexpr size_t kMaxModels = 64;
  Json doc = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError("retrieveUserQuota answer is not a JSON object");
  }
  std::vector<ModelQuotaInfo> out;
  auto buckets = doc.find("buckets");
  if (buckets == doc.end() || buckets->is_null()) return out;
  if (!buckets->is_array()) return absl::InvalidArgumentError("retrieveUserQuota: 'buckets' is not an array");
  for (const Json& b : *buckets) {
    const std::string model = StringAt(b, "modelId");
    if (model.empty()) continue;
    double fraction = 0;  // a bucket without remainingFraction is at 0
    if (auto f = b.find("remainingFraction"); f != b.end() && f->is_number()) {
      fraction = std::clamp(f->get<double>(), 0.0, 1.0);
    }
    // One model may have a bucket per token type: the scarcest one limits it.
    auto same = std::find_if(out.begin(), out.end(), [&](const ModelQuotaInfo& m) { return m.model == model; });
    if (same == out.end()) {
      if (out.size() >= kMaxModels) continue;
      out.push_back(ModelQuotaInfo{model, fraction, TimeAt(b, "resetTime")});
    } else if (fraction < same->remaining_fraction) {
      *same = ModelQuotaInfo{model, fraction, TimeAt(b, "resetTime")};
    }
  }
  std::sort(out.begin(), out.end(), [](const ModelQuotaInfo& a, const ModelQuotaInfo& b) { return a.model < b.model; });
  return out;
}

absl::StatusOr<OnboardOperation> ParseOnboardOperation(absl::string_view body) {
  Json doc = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError("onboardUser answer is not a JSON object");
  }
  OnboardOperation op;
  op.name = StringAt(doc, "name");
  if (!op.name.empty() && !SafeOperationName(op.name)) {
    return absl::InvalidArgumentError("onboardUser: the operation's 'name' is not a safe path");
  }
  if (auto d = doc.find("done"); d != doc.end() && d->is_boolean()) op.done = d->get<bool>();
  if (auto err = doc.find("error"); err != doc.end() && err->is_object()) {
    op.done = true;  // an operation with an error has finished
    std::string code;
    if (auto c = err->find("code"); c != err->end() && c->is_number_integer()) code = absl::StrCat(c->get<int64_t>(), " ");
    op.error = SafeText(absl::StrCat(code, StringAt(*err, "message")), kMaxUpstreamField);
    if (op.error.empty()) op.error = "the operation failed without a message";
    return op;
  }
  if (!op.done) {
    if (op.name.empty()) return absl::InvalidArgumentError("onboardUser: an operation that is not done has no 'name'");
    return op;
  }
  if (auto resp = doc.find("response"); resp != doc.end() && resp->is_object()) {
    if (auto p = resp->find("cloudaicompanionProject"); p != resp->end()) {
      op.project_id = p->is_string() ? p->get<std::string>() : StringAt(*p, "id");
    }
  }
  if (op.project_id.empty()) {
    return absl::InvalidArgumentError("onboardUser: the operation is done but names no cloudaicompanionProject");
  }
  if (op.project_id.size() > 128 ||
      !std::all_of(op.project_id.begin(), op.project_id.end(), [](char c) {
        return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' || c == ':';
      })) {
    return absl::InvalidArgumentError("onboardUser: the project id is not 1 to 128 of [A-Za-z0-9-_.:]");
  }
  return op;
}

absl::StatusOr<HttpResponse> CloudCodeClient::Call(const std::string& method, const std::string& access_token,
                                                   const std::string& body, absl::Duration timeout,
                                                   const std::string& get_path) const {
  absl::Status last = absl::UnavailableError("no Cloud Code base URL configured");
  for (const std::string& base : base_urls_) {
    HttpRequest req;
    req.url = get_path.empty() ? absl::StrCat(base, "/v1internal:", method) : absl::StrCat(base, "/v1internal/", get_path);
    req.body = body;
    req.timeout = timeout;
    req.egress = egress_;
    req.headers = {{"Authorization", absl::StrCat("Bearer ", access_token)}};
    absl::StatusOr<HttpResponse> resp = get_path.empty() ? http_.Post(req) : http_.Get(req);
    if (!resp.ok()) {
      last = resp.status();
      if (IsEgressFailure(last)) break;  // the account's way out is down, whichever base
      continue;
    }
    if (resp->status == 429 || resp->status >= 500) {
      last = StatusForResponse(*resp, method, clock_.Now());
      continue;  // the next base URL may have room
    }
    return resp;
  }
  return last;
}

absl::StatusOr<CodeAssistInfo> CloudCodeClient::LoadCodeAssist(const std::string& access_token) const {
  absl::StatusOr<HttpResponse> resp = Call("loadCodeAssist", access_token, R"({"metadata":{"ideType":"ANTIGRAVITY"}})", timeout_);
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "loadCodeAssist", clock_.Now());
  return ParseLoadCodeAssist(resp->body);
}

absl::StatusOr<std::vector<ModelQuotaInfo>> CloudCodeClient::FetchAvailableModels(
    const std::string& access_token, const std::string& project_id) const {
  std::string body = project_id.empty() ? "{}" : Json{{"project", project_id}}.dump();
  absl::StatusOr<HttpResponse> resp = Call("fetchAvailableModels", access_token, body, timeout_);
  if (resp.ok() && resp->status == 403 && !project_id.empty()) {
    resp = Call("fetchAvailableModels", access_token, "{}", timeout_);
  }
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "fetchAvailableModels", clock_.Now());
  return ParseAvailableModels(resp->body);
}

absl::StatusOr<std::vector<QuotaBucketInfo>> CloudCodeClient::RetrieveUserQuotaSummary(
    const std::string& access_token, const std::string& project_id) const {
  std::string body = project_id.empty() ? "{}" : Json{{"project", project_id}}.dump();
  absl::StatusOr<HttpResponse> resp = Call("retrieveUserQuotaSummary", access_token, body, timeout_);
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "retrieveUserQuotaSummary", clock_.Now());
  return ParseQuotaSummary(resp->body);
}

absl::StatusOr<std::vector<ModelQuotaInfo>> CloudCodeClient::RetrieveUserQuota(const std::string& access_token,
                                                                             const std::string& project_id) const {
  std::string body = project_id.empty() ? "{}" : Json{{"project", project_id}}.dump();
  absl::StatusOr<HttpResponse> resp = Call("retrieveUserQuota", access_token, body, timeout_);
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "retrieveUserQuota", clock_.Now());
  return ParseUserQuota(resp->body);
}

absl::StatusOr<OnboardOperation> CloudCodeClient::OnboardUser(const std::string& access_token,
                                                              const std::string& tier_id,
                                                              absl::Duration timeout) const {
  const std::string body =
      Json{{"tierId", tier_id}, {"metadata", {{"ideType", "ANTIGRAVITY"}, {"pluginType", "GEMINI"}}}}.dump();
  absl::StatusOr<HttpResponse> resp = Call("onboardUser", access_token, body, std::min(timeout, timeout_));
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "onboardUser", clock_.Now());
  return ParseOnboardOperation(resp->body);
}

absl::StatusOr<OnboardOperation> CloudCodeClient::GetOperation(const std::string& access_token,
                                                               const std::string& name,
                                                               absl::Duration timeout) const {
  if (!SafeOperationName(name)) return absl::InvalidArgumentError("onboardUser operation name is not a safe path");
  absl::StatusOr<HttpResponse> resp = Call("operation", access_token, "", std::min(timeout, timeout_), name);
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "onboardUser operation", clock_.Now());
  return ParseOnboardOperation(resp->body);
}

}  // namespace tokenbroker
