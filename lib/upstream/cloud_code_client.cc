#include "lib/upstream/cloud_code_client.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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

constexpr char kRetryDelayPayload[] = "tokenbroker/retry-delay-ms";

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
  return s;
}

}  // namespace

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

absl::StatusOr<HttpResponse> CloudCodeClient::Call(const std::string& method, const std::string& access_token,
                                                   const std::string& body) const {
  absl::Status last = absl::UnavailableError("no Cloud Code base URL configured");
  for (const std::string& base : base_urls_) {
    HttpRequest req;
    req.url = absl::StrCat(base, "/v1internal:", method);
    req.body = body;
    req.timeout = timeout_;
    req.egress = egress_;
    req.headers = {{"Authorization", absl::StrCat("Bearer ", access_token)}};
    absl::StatusOr<HttpResponse> resp = http_.Post(req);
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
  absl::StatusOr<HttpResponse> resp = Call("loadCodeAssist", access_token, R"({"metadata":{"ideType":"ANTIGRAVITY"}})");
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "loadCodeAssist", clock_.Now());
  return ParseLoadCodeAssist(resp->body);
}

absl::StatusOr<std::vector<ModelQuotaInfo>> CloudCodeClient::FetchAvailableModels(
    const std::string& access_token, const std::string& project_id) const {
  std::string body = project_id.empty() ? "{}" : Json{{"project", project_id}}.dump();
  absl::StatusOr<HttpResponse> resp = Call("fetchAvailableModels", access_token, body);
  if (resp.ok() && resp->status == 403 && !project_id.empty()) {
    resp = Call("fetchAvailableModels", access_token, "{}");
  }
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "fetchAvailableModels", clock_.Now());
  return ParseAvailableModels(resp->body);
}

absl::StatusOr<std::vector<QuotaBucketInfo>> CloudCodeClient::RetrieveUserQuotaSummary(
    const std::string& access_token, const std::string& project_id) const {
  std::string body = project_id.empty() ? "{}" : Json{{"project", project_id}}.dump();
  absl::StatusOr<HttpResponse> resp = Call("retrieveUserQuotaSummary", access_token, body);
  if (!resp.ok()) return resp.status();
  if (resp->status != 200) return StatusForResponse(*resp, "retrieveUserQuotaSummary", clock_.Now());
  return ParseQuotaSummary(resp->body);
}

}  // namespace tokenbroker
