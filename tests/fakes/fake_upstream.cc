#include "tests/fakes/fake_upstream.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "lib/common/account.h"
#include "nlohmann/json.hpp"

namespace tokenbroker::testing {
namespace {

constexpr absl::string_view kOperationsKey = "/v1internal/operations";

using Json = nlohmann::json;

std::string UrlDecode(absl::string_view in) {
  std::string out;
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '+') {
      out.push_back(' ');
    } else if (in[i] == '%' && i + 2 < in.size()) {
      int v = 0;
      if (absl::SimpleHexAtoi(in.substr(i + 1, 2), &v)) {
        out.push_back(static_cast<char>(v));
        i += 2;
      } else {
        out.push_back('%');
      }
    } else {
      out.push_back(in[i]);
    }
  }
  return out;
}

std::map<std::string, std::string> ParseForm(absl::string_view body) {
  std::map<std::string, std::string> out;
  for (absl::string_view pair : absl::StrSplit(body, '&', absl::SkipEmpty())) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(pair, absl::MaxSplits('=', 1));
    out[UrlDecode(kv.first)] = UrlDecode(kv.second);
  }
  return out;
}

bool WriteAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    off += static_cast<size_t>(n);
  }
  return true;
}

std::string StatusText(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Status";
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<FakeUpstream>> FakeUpstream::Start(Options options) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(options.port));
  if (::inet_pton(AF_INET, options.host.c_str(), &addr.sin_addr) != 1) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat("host must be an IPv4 address, got ", options.host));
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 128) != 0) {
    int err = errno;
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.host, ":", options.port,
                                               ": ", std::strerror(err)));
  }
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  std::unique_ptr<FakeUpstream> up(new FakeUpstream(std::move(options), fd, ntohs(addr.sin_port)));
  up->accept_thread_ = std::thread([p = up.get()] { p->AcceptLoop(); });
  return up;
}

FakeUpstream::FakeUpstream(Options options, int listen_fd, int port)
    : options_(std::move(options)),
      listen_fd_(listen_fd),
      port_(port),
      quota_(*options_.clock),
      expires_in_(options_.expires_in) {}

FakeUpstream::~FakeUpstream() {
  stopping_ = true;
  ::shutdown(listen_fd_, SHUT_RDWR);
  ::close(listen_fd_);
  if (accept_thread_.joinable()) accept_thread_.join();
  std::map<int64_t, std::thread> workers;
  {
    absl::MutexLock lock(&mu_);
    workers.swap(workers_);
  }
  for (auto& [id, t] : workers) t.join();
}

std::string FakeUpstream::base_url() const { return absl::StrCat("http://", options_.host, ":", port_); }

void FakeUpstream::AcceptLoop() {
  while (!stopping_) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // listening socket closed
    }
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    // Joining finished threads keeps a long run (a simulation makes tens of thousands of
    // connections) from holding a stack per connection ever made.
    std::vector<std::thread> done;
    {
      absl::MutexLock lock(&mu_);
      for (int64_t id : finished_workers_) {
        auto it = workers_.find(id);
        done.push_back(std::move(it->second));
        workers_.erase(it);
      }
      finished_workers_.clear();
      const int64_t id = next_worker_++;
      workers_.emplace(id, std::thread([this, fd, id] {
                         Serve(fd);
                         absl::MutexLock lock(&mu_);
                         finished_workers_.push_back(id);
                       }));
    }
    for (std::thread& t : done) t.join();
  }
}

void FakeUpstream::Serve(int fd) {
  std::string data;
  char buf[4096];
  size_t header_end = std::string::npos;
  while ((header_end = data.find("\r\n\r\n")) == std::string::npos) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0 || data.size() > (1 << 20)) {
      ::close(fd);
      return;
    }
    data.append(buf, static_cast<size_t>(n));
  }
  std::vector<std::string> lines = absl::StrSplit(data.substr(0, header_end), "\r\n");
  std::vector<std::string> request_line = absl::StrSplit(lines[0], ' ');
  if (request_line.size() < 2) {
    ::close(fd);
    return;
  }
  std::map<std::string, std::string> headers;
  for (size_t i = 1; i < lines.size(); ++i) {
    size_t colon = lines[i].find(':');
    if (colon == std::string::npos) continue;
    headers[absl::AsciiStrToLower(lines[i].substr(0, colon))] =
        std::string(absl::StripAsciiWhitespace(lines[i].substr(colon + 1)));
  }
  size_t content_length = 0;
  if (auto it = headers.find("content-length"); it != headers.end()) {
    (void)absl::SimpleAtoi(it->second, &content_length);
  }
  std::string body = data.substr(header_end + 4);
  while (body.size() < content_length) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) {
      ::close(fd);
      return;
    }
    body.append(buf, static_cast<size_t>(n));
  }
  std::string path = request_line[1];
  if (size_t q = path.find('?'); q != std::string::npos) path.resize(q);

  sockaddr_storage peer_addr{};
  socklen_t peer_len = sizeof peer_addr;
  char peer[INET6_ADDRSTRLEN] = "";
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer_addr), &peer_len) == 0) {
    if (peer_addr.ss_family == AF_INET) {
      ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&peer_addr)->sin_addr, peer, sizeof peer);
    } else if (peer_addr.ss_family == AF_INET6) {
      ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&peer_addr)->sin6_addr, peer, sizeof peer);
    }
  }
  Response resp = Handle(request_line[0], path, headers, body, peer);
  std::string out = absl::StrFormat(
      "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n",
      resp.status, StatusText(resp.status), resp.body.size());
  out += resp.body;
  WriteAll(fd, out);
  ::close(fd);
}

FakeUpstream::Response FakeUpstream::Handle(const std::string& method, const std::string& path,
                                            const std::map<std::string, std::string>& headers,
                                            const std::string& body, const std::string& peer) {
  if (absl::StartsWith(path, "/__fake/")) return HandleAdmin(path, body);

  // Which account is asking: the refresh token in the form, or the one behind the bearer token.
  std::string account;
  if (path == "/token") {
    auto form = ParseForm(body);
    account = form["refresh_token"];
  } else if (auto it = headers.find("authorization"); it != headers.end()) {
    absl::MutexLock lock(&mu_);
    std::string bearer(absl::StripPrefix(it->second, "Bearer "));
    if (auto a = access_to_refresh_.find(bearer); a != access_to_refresh_.end()) account = a->second;
  }

  // Every operation's polls count (and are scripted) under one key.
  const std::string key = absl::StartsWith(path, "/v1internal/operations/") ? std::string(kOperationsKey) : path;
  std::optional<ScriptedReply> scripted;
  {
    absl::MutexLock lock(&mu_);
    ++calls_[key];
    int64_t now_in_flight = ++in_flight_[key];
    max_in_flight_[key] = std::max(max_in_flight_[key], now_in_flight);
    if (key == "/token") ++token_calls_[account];
    ++account_calls_[key][account];
    int64_t& mine = account_max_in_flight_[key][account];
    mine = std::max(mine, ++account_in_flight_[key][account]);
    if (!peer.empty()) ++account_peers_[key][account][peer];
    auto& scripts = scripts_[key];
    for (auto it = scripts.begin(); it != scripts.end(); ++it) {
      if (!it->match.empty() && it->match != account) continue;
      scripted = *it;
      if (it->times > 0 && --it->times == 0) scripts.erase(it);
      break;
    }
  }
  Response resp;
  if (scripted) {
    if (scripted->delay > absl::ZeroDuration()) absl::SleepFor(scripted->delay);
    resp = Response{scripted->status, scripted->body};
  } else if (method == "GET" && key == kOperationsKey) {
    resp = HandleCloudCode(path, headers, body);
  } else if (method != "POST") {
    resp = Response{404, R"({"error":{"code":404,"message":"not found"}})"};
  } else if (path == "/token") {
    resp = HandleToken(body);
  } else {
    resp = HandleCloudCode(path, headers, body);
  }
  absl::MutexLock lock(&mu_);
  --in_flight_[key];
  --account_in_flight_[key][account];
  return resp;
}

FakeUpstream::Response FakeUpstream::HandleToken(const std::string& body) {
  auto form = ParseForm(body);
  if (form["grant_type"] != "refresh_token" || form["refresh_token"].empty()) {
    return Response{400, R"({"error":"invalid_request","error_description":"Missing required parameter: refresh_token"})"};
  }
  absl::BitGen rng;
  absl::MutexLock lock(&mu_);
  std::string token = absl::StrFormat("ya29.fake-%d-%016x", next_token_++, absl::Uniform<uint64_t>(rng));
  issued_.push_back(token);
  access_to_refresh_[token] = form["refresh_token"];
  Json out = {{"access_token", token}, {"expires_in", expires_in_}, {"token_type", "Bearer"},
              {"scope", "https://www.googleapis.com/auth/cloud-platform"}};
  return Response{200, out.dump()};
}

FakeUpstream::Response FakeUpstream::HandleCloudCode(const std::string& path,
                                                     const std::map<std::string, std::string>& headers,
                                                     const std::string& body) {
  auto auth = headers.find("authorization");
  std::string bearer = auth == headers.end() ? "" : std::string(absl::StripPrefix(auth->second, "Bearer "));
  std::string account;
  AccountProfile profile;
  {
    absl::MutexLock lock(&mu_);
    auto owner = access_to_refresh_.find(bearer);
    if (owner == access_to_refresh_.end()) {
      return Response{401, R"({"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}})"};
    }
    account = owner->second;
    if (auto p = profiles_.find(account); p != profiles_.end()) profile = p->second;
  }
  const AccountQuotaProfile quota_profile{std::string(TierName(ParseTier(profile.tier_id))), profile.budgets};
  if (profile.suspended) {
    return Response{403, R"({"error":{"code":403,"status":"PERMISSION_DENIED","message":"This service has been disabled in this account for violation of Terms of Service. If you believe this is an error, contact support."}})"};
  }
  if (path == "/v1internal:loadCodeAssist") {
    Json out = {{"currentTier", {{"id", profile.tier_id}, {"name", profile.tier_id}}},
                {"allowedTiers", Json::array({{{"id", "free-tier"}, {"isDefault", true}}})}};
    if (!profile.ineligible_reason.empty()) {
      out["allowedTiers"] = Json::array();
      out["ineligibleTiers"] = Json::array({{{"tierId", "free-tier"}, {"reasonCode", "INELIGIBLE_ACCOUNT"},
                                              {"reasonMessage", profile.ineligible_reason}}});
    }
    if (!profile.project.empty()) out["cloudaicompanionProject"] = profile.project;
    if (profile.tier_id != "free-tier") out["paidTier"] = {{"id", profile.tier_id}, {"name", profile.tier_id}};
    return Response{200, out.dump()};
  }
  if (path == "/v1internal:onboardUser") return HandleOnboard(account, profile, body);
  if (absl::StartsWith(path, "/v1internal/operations/")) return HandleOperation(account, path);
  if (path == "/v1internal:retrieveUserQuota") {
    if (profile.user_quota_json.empty()) {
      return Response{404, R"({"error":{"code":404,"message":"not found","status":"NOT_FOUND"}})"};
    }
    return Response{200, absl::StrCat(R"({"buckets":)", profile.user_quota_json, "}")};
  }
  if (path == "/v1internal:generateContent") {
    if (profile.credits_exhausted) {
      Json req = Json::parse(body, nullptr, false);
      if (req.is_object() && req.contains("enabledCreditTypes")) {
        return Response{429, absl::StrCat(
            R"({"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"Insufficient Google One AI credits.",)",
            R"("details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"INSUFFICIENT_G1_CREDITS_BALANCE",)",
            R"("domain":"cloudcode-pa.googleapis.com","metadata":{"quotaResetDelay":")", profile.credits_reset_s,
            R"(s"}}]}})")};
      }
    }
    if (quota_.enabled()) {
      Json req = Json::parse(body, nullptr, false);
      if (req.is_discarded() || !req.is_object() || !req.contains("model") || !req["model"].is_string() ||
          req["model"].get<std::string>().empty()) {
        return Response{400, R"({"error":{"code":400,"message":"Invalid JSON payload: 'model' is required.","status":"INVALID_ARGUMENT"}})"};
      }
      if (auto reply = quota_.Generate(account, quota_profile, req["model"].get<std::string>())) {
        return Response{reply->status, std::move(reply->body)};
      }
    }
    return Response{200, R"({"response":{"candidates":[{"content":{"role":"model","parts":[{"text":"Hello from the fake upstream."}]}}]}})"};
  }
  if (path == "/v1internal:fetchAvailableModels") {
    if (auto models = quota_.AvailableModelsJson(account, quota_profile, profile.models_json)) {
      return Response{200, absl::StrCat(R"({"models":)", *models, "}")};
    }
    Json models = Json::parse(profile.models_json, nullptr, false);
    if (models.is_discarded()) models = Json::object();
    return Response{200, Json{{"models", models}}.dump()};
  }
  if (path == "/v1internal:retrieveUserQuotaSummary") {
    if (!profile.quota_summary) {
      return Response{404, R"({"error":{"code":404,"message":"not found","status":"NOT_FOUND"}})"};
    }
    if (auto summary = quota_.QuotaSummaryJson(account, quota_profile)) return Response{200, *std::move(summary)};
    if (!profile.summary_json.empty()) return Response{200, profile.summary_json};
    return Response{200, R"({"groups":[]})"};
  }
  return Response{404, R"({"error":{"code":404,"message":"not found","status":"NOT_FOUND"}})"};
}

FakeUpstream::Response FakeUpstream::HandleOnboard(const std::string& account, const AccountProfile& profile,
                                                   const std::string& body) {
  Json req = Json::parse(body, nullptr, false);
  if (req.is_discarded() || !req.is_object() || !req.contains("tierId") || !req["tierId"].is_string()) {
    return Response{400, R"({"error":{"code":400,"message":"tierId is required.","status":"INVALID_ARGUMENT"}})"};
  }
  absl::MutexLock lock(&mu_);
  if (operations_.size() >= 1000) operations_.erase(operations_.begin());
  const std::string name = absl::StrCat("operations/onboard-", next_operation_++);
  Operation op{account, profile.onboard_polls, profile.onboard_project, profile.onboard_error};
  if (op.project.empty()) op.project = absl::StrCat("onboarded-", next_operation_ - 1);
  operations_[name] = op;
  if (op.polls_left > 0) return Response{200, Json{{"name", name}, {"done", false}}.dump()};
  return FinishOperationLocked(name);
}

FakeUpstream::Response FakeUpstream::HandleOperation(const std::string& account, const std::string& path) {
  const std::string name(absl::StripPrefix(path, "/v1internal/"));
  absl::MutexLock lock(&mu_);
  auto it = operations_.find(name);
  if (it == operations_.end() || it->second.account != account) {
    return Response{404, R"({"error":{"code":404,"message":"operation not found","status":"NOT_FOUND"}})"};
  }
  if (--it->second.polls_left > 0) return Response{200, Json{{"name", name}, {"done", false}}.dump()};
  return FinishOperationLocked(name);
}

FakeUpstream::Response FakeUpstream::FinishOperationLocked(const std::string& name) {
  const Operation& op = operations_[name];
  if (!op.error.empty()) {
    return Response{200, Json{{"name", name}, {"done", true},
                              {"error", {{"code", 9}, {"message", op.error}}}}.dump()};
  }
  // From now on loadCodeAssist names the project.
  profiles_[op.account].project = op.project;
  return Response{200, Json{{"name", name}, {"done", true},
                            {"response", {{"@type", "type.googleapis.com/google.internal.cloud.code.v1internal.OnboardUserResponse"},
                                          {"cloudaicompanionProject", {{"id", op.project}, {"name", op.project}}}}}}.dump()};
}

FakeUpstream::Response FakeUpstream::HandleAdmin(const std::string& path, const std::string& body) {
  if (path == "/__fake/stats") return Response{200, StatsJson()};
  if (path == "/__fake/quota_stats") return Response{200, QuotaStatsJson()};
  if (path == "/__fake/quota") {
    absl::StatusOr<FakeQuotaConfig> config = ParseFakeQuotaConfig(body);
    if (!config.ok()) return Response{400, Json{{"error", std::string(config.status().message())}}.dump()};
    ConfigureQuota(*std::move(config));
    return Response{200, "{}"};
  }
  Json req = Json::parse(body, nullptr, false);
  if (req.is_discarded() || !req.is_object()) return Response{400, R"({"error":"body must be a JSON object"})"};
  if (path == "/__fake/script") {
    ScriptedReply r;
    r.status = req.value("status", 500);
    r.body = req.value("body", "");
    r.delay = absl::Milliseconds(req.value("delay_ms", 0));
    r.times = req.value("times", 1);
    r.match = req.value("match", "");
    Script(req.value("path", "/token"), std::move(r));
    return Response{200, "{}"};
  }
  if (path == "/__fake/expires_in") {
    SetExpiresIn(req.value("seconds", 3599));
    return Response{200, "{}"};
  }
  if (path == "/__fake/profile") {
    AccountProfile p;
    p.project = req.value("project", "");
    p.tier_id = req.value("tier", "free-tier");
    p.onboard_project = req.value("onboard_project", "");
    p.onboard_polls = req.value("onboard_polls", 0);
    p.onboard_error = req.value("onboard_error", "");
    p.quota_summary = req.value("quota_summary", true);
    if (auto u = req.find("user_quota"); u != req.end()) p.user_quota_json = u->dump();
    p.credits_exhausted = req.value("credits_exhausted", false);
    p.credits_reset_s = req.value("credits_reset_s", 3600);
    p.ineligible_reason = req.value("ineligible_reason", "");
    if (auto m = req.find("models"); m != req.end()) p.models_json = m->dump();
    if (auto q = req.find("summary"); q != req.end()) p.summary_json = q->dump();
    p.suspended = req.value("suspended", false);
    if (auto b = req.find("budgets"); b != req.end()) {
      absl::StatusOr<FamilyBudgets> budgets = ParseFamilyBudgets(b->dump());
      if (!budgets.ok()) return Response{400, Json{{"error", std::string(budgets.status().message())}}.dump()};
      p.budgets = *std::move(budgets);
    }
    SetProfile(req.value("refresh_token", ""), std::move(p));
    return Response{200, "{}"};
  }
  return Response{404, R"({"error":"unknown admin path"})"};
}

void FakeUpstream::Script(const std::string& path, ScriptedReply reply) {
  absl::MutexLock lock(&mu_);
  scripts_[path].push_back(std::move(reply));
}

void FakeUpstream::ConfigureQuota(FakeQuotaConfig config) { quota_.Configure(std::move(config)); }

std::string FakeUpstream::QuotaStatsJson() const { return quota_.StatsJson(); }

void FakeUpstream::SetExpiresIn(int seconds) {
  absl::MutexLock lock(&mu_);
  expires_in_ = seconds;
}

void FakeUpstream::SetProfile(const std::string& refresh_token, AccountProfile profile) {
  absl::MutexLock lock(&mu_);
  profiles_[refresh_token] = std::move(profile);
}

int64_t FakeUpstream::Calls(const std::string& path) const {
  absl::MutexLock lock(&mu_);
  auto it = calls_.find(path);
  return it == calls_.end() ? 0 : it->second;
}

int64_t FakeUpstream::TokenCallsFor(const std::string& refresh_token) const {
  absl::MutexLock lock(&mu_);
  auto it = token_calls_.find(refresh_token);
  return it == token_calls_.end() ? 0 : it->second;
}

int64_t FakeUpstream::CallsFor(const std::string& path, const std::string& refresh_token) const {
  absl::MutexLock lock(&mu_);
  auto p = account_calls_.find(path);
  if (p == account_calls_.end()) return 0;
  auto it = p->second.find(refresh_token);
  return it == p->second.end() ? 0 : it->second;
}

std::map<std::string, int64_t> FakeUpstream::PeersFor(const std::string& path, const std::string& refresh_token) const {
  absl::MutexLock lock(&mu_);
  auto p = account_peers_.find(path);
  if (p == account_peers_.end()) return {};
  auto it = p->second.find(refresh_token);
  return it == p->second.end() ? std::map<std::string, int64_t>{} : it->second;
}

int64_t FakeUpstream::MaxInFlight(const std::string& path) const {
  absl::MutexLock lock(&mu_);
  auto it = max_in_flight_.find(path);
  return it == max_in_flight_.end() ? 0 : it->second;
}

int64_t FakeUpstream::MaxInFlightFor(const std::string& path, const std::string& refresh_token) const {
  absl::MutexLock lock(&mu_);
  auto p = account_max_in_flight_.find(path);
  if (p == account_max_in_flight_.end()) return 0;
  auto it = p->second.find(refresh_token);
  return it == p->second.end() ? 0 : it->second;
}

std::vector<std::string> FakeUpstream::IssuedAccessTokens() const {
  absl::MutexLock lock(&mu_);
  return issued_;
}

std::string FakeUpstream::StatsJson() const {
  absl::MutexLock lock(&mu_);
  Json out = {{"calls", calls_}, {"token_calls", token_calls_}, {"max_in_flight", max_in_flight_},
              {"calls_by_account", account_calls_}, {"in_flight", in_flight_},
              {"max_in_flight_by_account", account_max_in_flight_}, {"peers_by_account", account_peers_},
              {"issued_access_tokens", issued_}};
  return out.dump();
}

}  // namespace tokenbroker::testing
