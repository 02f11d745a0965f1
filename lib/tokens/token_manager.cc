#include "lib/tokens/token_manager.h"

#include <algorithm>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "lib/common/safe_text.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {

TokenManager::TokenManager(TokenManagerOptions options, AccountPool& pool, const OAuthClient& oauth,
                           const AccountStore* store, const Clock& clock)
    : options_(options), pool_(pool), oauth_(oauth), store_(store), clock_(clock) {}

TokenManager::~TokenManager() { Stop(); }

void TokenManager::Start() {
  absl::MutexLock lock(&mu_);
  if (started_) return;
  started_ = true;
  for (int i = 0; i < std::max(1, options_.workers); ++i) threads_.emplace_back([this] { WorkerLoop(); });
  if (options_.background_refresh) threads_.emplace_back([this] { BackgroundLoop(); });
  threads_.emplace_back([this] { GiveUpLoop(); });
}

void TokenManager::Stop() {
  absl::flat_hash_map<std::string, std::vector<Waiter>> abandoned;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    queue_.clear();
  }
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  {
    absl::MutexLock lock(&mu_);
    abandoned.swap(inflight_);
    give_ups_.clear();
  }
  for (auto& [id, waiters] : abandoned) {
    for (Waiter& w : waiters) std::move(w.done)(absl::UnavailableError("token manager is shutting down"));
  }
}

void TokenManager::Acquire(const std::string& account_id, absl::Time give_up, Callback done) {
  absl::StatusOr<Credentials> creds = pool_.GetCredentials(account_id);
  if (!creds.ok()) {
    std::move(done)(creds.status());
    return;
  }
  if (creds->disabled) {
    std::move(done)(absl::FailedPreconditionError(absl::StrCat("account ", account_id, " is disabled")));
    return;
  }
  const absl::Time now = clock_.Now();
  const bool has_token = !creds->access_token.empty() && creds->access_expiry > now;
  if (has_token && creds->access_expiry - now >= options_.min_token_ttl) {
    std::move(done)(AccessToken{creds->access_token, creds->access_expiry});
    return;
  }
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    if (auto s = short_.find(account_id); has_token && s != short_.end() && now - s->second < options_.short_token_retry) {
      // Refreshing just gave this short-lived token: another refresh now would give the same.
      refused = absl::OkStatus();
    } else if (std::optional<absl::Time> until = BackoffUntilLocked(account_id, now)) {
      const Failures& f = failures_.at(account_id);
      refused = absl::UnavailableError(absl::StrCat(
          "token refresh of account ", account_id, " failed ", f.in_a_row, f.in_a_row == 1 ? " time" : " times in a row",
          " (", f.last_error, "); next try in ", absl::FormatDuration(absl::Ceil(*until - now, absl::Seconds(1)))));
    } else if (started_ && !stopping_) {
      ScheduleLocked(account_id, &done, give_up);
      return;
    } else {
      refused = absl::UnavailableError("token manager is not running");
    }
  }
  if (refused.ok()) {
    std::move(done)(AccessToken{creds->access_token, creds->access_expiry, /*below_min_ttl=*/true});
  } else {
    std::move(done)(refused);
  }
}

void TokenManager::ScheduleLocked(const std::string& account_id, Callback* done, absl::Time give_up) {
  auto [it, inserted] = inflight_.try_emplace(account_id);
  if (done != nullptr) {
    const uint64_t id = ++next_waiter_;
    it->second.push_back(Waiter{id, std::move(*done)});
    if (give_up != absl::InfiniteFuture()) {
      give_ups_.emplace(give_up, std::make_pair(account_id, id));
      give_ups_changed_ = true;
    }
  }
  if (inserted) queue_.push_back(account_id);
}

std::optional<absl::Time> TokenManager::BackoffUntilLocked(const std::string& account_id, absl::Time now) const {
  auto it = failures_.find(account_id);
  if (it == failures_.end() || it->second.until <= now) return std::nullopt;
  return it->second.until;
}

void TokenManager::RecordOutcomeLocked(const std::string& account_id, const absl::StatusOr<AccessToken>& result,
                                       absl::Time now) {
  slow_.erase(account_id);
  absl::Cleanup note = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { NoteTroubleLocked(); };
  if (result.ok()) {
    failures_.erase(account_id);
    if (result->expiry - now < options_.min_token_ttl) {
      short_[account_id] = now;
    } else {
      short_.erase(account_id);
    }
    return;
  }
  if (!absl::IsUnavailable(result.status())) return;  // disabled, unknown, shutting down: not a refresh failure
  Failures& f = failures_[account_id];
  ++f.in_a_row;
  absl::Duration wait = options_.failure_backoff;
  for (int i = 1; i < f.in_a_row && wait < options_.max_failure_backoff; ++i) wait *= 2;
  f.until = now + std::min(wait, options_.max_failure_backoff);
  f.last_error = SafeText(result.status().message(), 200);
}

absl::flat_hash_map<std::string, TokenTroubleInfo> TokenManager::Troubled() const {
  absl::flat_hash_map<std::string, TokenTroubleInfo> out;
  if (!any_trouble_.load(std::memory_order_acquire)) return out;
  const absl::Time now = clock_.Now();
  {
    absl::MutexLock lock(&mu_);
    if (failures_.empty() && slow_.empty() && short_.empty()) return out;
    for (const auto& [id, f] : failures_) {
      if (f.until > now) {
        out[id] = {TokenTrouble::kFailing, f.until,
                   absl::StrCat("its token refresh is failing (", f.last_error, ")")};
      }
    }
    for (const std::string& id : slow_) out[id] = {TokenTrouble::kSlow, absl::InfiniteFuture(), "its token refresh is slow"};
    for (const auto& [id, at] : short_) {
      if (!out.contains(id)) {
        out[id] = {TokenTrouble::kShortLived, at + options_.short_token_retry,
                   "its token is valid for less than min_token_ttl"};
      }
    }
  }
  // Only accounts without a token good for min_token_ttl are trouble: a failing background
  // refresh of a token that is still good changes nothing for callers.
  for (auto it = out.begin(); it != out.end();) {
    absl::StatusOr<Credentials> creds = pool_.GetCredentials(it->first);
    const bool good = creds.ok() && !creds->access_token.empty() &&
                      creds->access_expiry - now >= options_.min_token_ttl;
    if (good) {
      out.erase(it++);
    } else {
      ++it;
    }
  }
  return out;
}

void TokenManager::GiveUpLoop() {
  while (true) {
    std::vector<Callback> expired;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || give_ups_changed_ || (!give_ups_.empty() && give_ups_.begin()->first <= clock_.Now());
      };
      if (!ready()) {
        // Until the earliest give-up on the injected clock (a FakeClock wakes this when it gets
        // there), a new give-up, or Stop.
        clock_.AwaitUntil(mu_,
                          absl::Condition(
                              +[](TokenManager* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                return self->stopping_ || self->give_ups_changed_;
                              },
                              this),
                          give_ups_.empty() ? absl::InfiniteFuture() : give_ups_.begin()->first);
      }
      if (stopping_) return;
      give_ups_changed_ = false;
      const absl::Time now = clock_.Now();
      while (!give_ups_.empty() && give_ups_.begin()->first <= now) {
        auto [account, id] = give_ups_.begin()->second;
        give_ups_.erase(give_ups_.begin());
        auto waiters = inflight_.find(account);
        if (waiters == inflight_.end()) continue;  // the refresh ended; it was answered
        auto& list = waiters->second;
        auto w = std::find_if(list.begin(), list.end(), [id = id](const Waiter& x) { return x.id == id; });
        if (w == list.end()) continue;
        expired.push_back(std::move(w->done));
        list.erase(w);
        // The refresh goes on (for the next caller and the background); callers avoid the account
        // until it ends.
        slow_.insert(account);
        NoteTroubleLocked();
      }
    }
    for (Callback& cb : expired) {
      std::move(cb)(absl::DeadlineExceededError("token refresh is taking longer than this call can wait; "
                                                "it goes on in the background"));
    }
  }
}

void TokenManager::WorkerLoop() {
  while (true) {
    std::string id;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](TokenManager* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return self->stopping_ || !self->queue_.empty();
          },
          this));
      if (stopping_) return;
      id = std::move(queue_.front());
      queue_.pop_front();
    }
    RunRefresh(id);
  }
}

void TokenManager::BackgroundLoop() {
  while (true) {
    std::vector<std::string> due = pool_.ExpiringBefore(clock_.Now() + options_.refresh_ahead);
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    const absl::Time now = clock_.Now();
    for (const std::string& id : due) {
      auto s = short_.find(id);
      const bool just_short = s != short_.end() && now - s->second < options_.short_token_retry;
      if (!BackoffUntilLocked(id, now) && !just_short) ScheduleLocked(id, nullptr, absl::InfiniteFuture());
    }
    ++scans_;
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), options_.scan_interval);
    if (stopping_) return;
  }
}

void TokenManager::RunRefresh(const std::string& account_id) {
  absl::StatusOr<AccessToken> result = DoRefresh(account_id);
  const absl::Time now = clock_.Now();
  if (result.ok()) result->below_min_ttl = result->expiry - now < options_.min_token_ttl;
  std::vector<Waiter> waiters;
  absl::Time backoff_until;
  {
    absl::MutexLock lock(&mu_);
    RecordOutcomeLocked(account_id, result, now);
    backoff_until = BackoffUntilLocked(account_id, now).value_or(now);
    if (auto it = inflight_.find(account_id); it != inflight_.end()) {
      waiters.swap(it->second);
      inflight_.erase(it);
    }
    // Their give-up entries are skipped when they come due (the account has no waiters then).
  }
  // Its egress is down: the account is cooled for as long as its refresh backs off.
  if (!result.ok() && IsEgressFailure(result.status())) OnEgressFailure(account_id, result.status(), backoff_until);
  for (Waiter& w : waiters) std::move(w.done)(result);
}

absl::StatusOr<AccessToken> TokenManager::DoRefresh(const std::string& account_id) {
  absl::StatusOr<Credentials> creds = pool_.GetCredentials(account_id);
  if (!creds.ok()) return creds.status();
  if (creds->disabled) {
    return absl::FailedPreconditionError(absl::StrCat("account ", account_id, " is disabled"));
  }
  const absl::Time start = clock_.Now();
  // Another path may have refreshed it since this was queued: skip only a token that is good
  // for both the background window and the minimum TTL a caller is promised.
  if (!creds->access_token.empty() &&
      creds->access_expiry - start > std::max(options_.refresh_ahead, options_.min_token_ttl)) {
    return AccessToken{creds->access_token, creds->access_expiry};
  }
  if (shared_ != nullptr && shared_->Up()) {
    if (std::optional<absl::StatusOr<AccessToken>> r = RefreshShared(account_id, *creds, start)) return *std::move(r);
  }
  return RefreshWithOAuth(account_id, *creds, start, /*fence=*/0);
}

std::optional<absl::StatusOr<AccessToken>> TokenManager::RefreshShared(const std::string& account_id,
                                                                       const Credentials& creds, absl::Time start) {
  // Good for the background window too, as the local check above asks.
  const absl::Time min_expiry = start + std::max(options_.refresh_ahead, options_.min_token_ttl);
  // Another replica's refresh (OAuth timeouts and retries included) is waited for this long.
  const absl::Time give_up = clock_.Now() + absl::Seconds(30);
  while (true) {
    absl::StatusOr<int64_t> fence = shared_->LockRefresh(account_id, min_expiry);
    if (!fence.ok()) return std::nullopt;  // the backend is down: refresh here
    if (*fence > 0) return RefreshWithOAuth(account_id, creds, start, *fence);
    // Another replica is refreshing (0) or already stored a good token (-1).
    if (*fence == 0) shared_->WaitForToken(account_id, std::min(give_up, clock_.Now() + absl::Milliseconds(250)));
    absl::StatusOr<Credentials> now = pool_.GetCredentials(account_id);
    if (!now.ok()) return now.status();
    if (now->disabled) return absl::FailedPreconditionError(absl::StrCat("account ", account_id, " is disabled"));
    if (!now->access_token.empty() && now->access_expiry >= min_expiry) {
      return AccessToken{now->access_token, now->access_expiry};
    }
    if (std::optional<SharedToken> t = shared_->FetchToken(account_id, min_expiry)) {
      pool_.OnRemoteToken(account_id, *t);
      return AccessToken{t->access_token, t->expiry};
    }
    if (clock_.Now() >= give_up || !shared_->Up()) return std::nullopt;
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::UnavailableError("token manager is shutting down");
  }
}

absl::StatusOr<AccessToken> TokenManager::RefreshWithOAuth(const std::string& account_id, const Credentials& creds,
                                                           absl::Time start, int64_t fence) {
  absl::StatusOr<EgressRoute> route = EgressFor(account_id);
  if (!route.ok()) {
    if (fence > 0) shared_->UnlockRefresh(account_id, fence);
    return route.status();
  }
  absl::StatusOr<TokenGrant> grant = oauth_.Refresh(creds.refresh_token, *route);
  if (grant.ok()) {
    const absl::Time expiry = start + grant->expires_in;
    pool_.SetToken(account_id, grant->access_token, expiry, grant->refresh_token);
    {
      absl::MutexLock lock(&mu_);
      ++counts_["ok"];
    }
    spdlog::debug("refreshed token of account {}; it expires in {}", account_id,
                  absl::FormatDuration(grant->expires_in));
    AccountUpdate update;
    update.access_token = grant->access_token;
    update.access_expiry = expiry;
    update.refresh_token = grant->refresh_token;
    if (fence > 0 && !shared_->StoreToken(account_id, SharedToken{grant->access_token, expiry, grant->refresh_token},
                                          fence)) {
      spdlog::debug("token of account {} not shared: another replica stored a newer one", account_id);
    }
    WriteBack(account_id, update);
    return AccessToken{grant->access_token, expiry};
  }
  if (fence > 0) shared_->UnlockRefresh(account_id, fence);
  if (IsInvalidGrant(grant.status())) {
    // The description is the token endpoint's text: kept for operators only escaped and bounded.
    std::string reason = SafeText(grant.status().message(), 300);
    {
      absl::MutexLock lock(&mu_);
      ++counts_["invalid_grant"];
    }
    Disable(account_id, reason);
    return absl::FailedPreconditionError(absl::StrCat("account ", account_id, " disabled: ", reason));
  }
  {
    absl::MutexLock lock(&mu_);
    ++counts_["error"];
  }
  spdlog::warn("token refresh of account {} failed: {}", account_id, std::string(grant.status().message()));
  absl::Status failed =
      absl::UnavailableError(absl::StrCat("token refresh of account ", account_id, " failed: ", grant.status().message()));
  // An egress failure stays one (the account is cooled for it, not counted against Google).
  grant.status().ForEachPayload([&failed](absl::string_view type, const absl::Cord& p) { failed.SetPayload(type, p); });
  return failed;
}

void TokenManager::Disable(const std::string& account_id, const std::string& reason) {
  pool_.Disable(account_id, reason);
  if (shared_ != nullptr) shared_->AccountDisabled(account_id, reason);
  spdlog::warn("account {} disabled: {}", account_id, reason);
  AccountUpdate update;
  update.disabled_reason = reason;
  update.disabled_at = clock_.Now();
  WriteBack(account_id, update);
}

void TokenManager::ApplyObservations(const std::vector<QuotaObservation>& observations) {
  for (const QuotaObservation& o : observations) {
    if (!o.suspended || !pool_.Suspend(o.account_id, o.suspension_message)) continue;
    const std::string reason = SuspendedReason(o.suspension_message);
    {
      absl::MutexLock lock(&mu_);
      ++counts_["suspended"];
    }
    if (shared_ != nullptr) shared_->AccountDisabled(o.account_id, reason);
    spdlog::error("account {} {}; it is not handed out again until an operator enables it "
                  "(ResetAccount with enable, tbctl reset --enable)", o.account_id, reason);
    AccountUpdate update;
    update.disabled_reason = reason;
    update.disabled_at = clock_.Now();
    update.suspended = true;
    WriteBack(o.account_id, update);
  }
}

int64_t TokenManager::suspensions() const {
  absl::MutexLock lock(&mu_);
  auto it = counts_.find("suspended");
  return it == counts_.end() ? 0 : it->second;
}

void TokenManager::Enable(const std::string& account_id) {
  {
    absl::MutexLock lock(&mu_);
    failures_.erase(account_id);
    short_.erase(account_id);
    NoteTroubleLocked();
  }
  AccountUpdate update;
  update.enable = true;
  WriteBack(account_id, update);
}

void TokenManager::WriteBack(const std::string& account_id, const AccountUpdate& update) {
  if (store_ == nullptr) return;
  absl::Status s = store_->Update(account_id, update);
  absl::MutexLock lock(&mu_);
  if (s.ok()) {
    write_failed_.erase(account_id);
    return;
  }
  // A folder we may not write (a mounted Secret, a read-only volume) is one fact, said once.
  if (absl::IsPermissionDenied(s) || absl::IsFailedPrecondition(s)) {
    if (!read_only_reported_) {
      read_only_reported_ = true;
      if (shared_ != nullptr) {
        spdlog::warn(
            "accounts directory {} is read-only ({}): refreshed tokens and disabled accounts are kept in memory "
            "and in the shared state backend",
            store_->dir(), std::string(s.message()));
      } else {
        spdlog::error(
            "accounts directory {} is read-only ({}): refreshed tokens and disabled accounts are kept in this "
            "process's memory only and are lost on restart",
            store_->dir(), std::string(s.message()));
      }
    }
    return;
  }
  if (write_failed_.insert(account_id).second) {
    spdlog::error(
        "could not update the file of account {} ({}); the change is kept in memory for the life of this process",
        account_id, std::string(s.message()));
  }
}

std::map<std::string, int64_t> TokenManager::RefreshCounts() const {
  absl::MutexLock lock(&mu_);
  return counts_;
}

}  // namespace tokenbroker

namespace tokenbroker {

int64_t TokenManager::ScanCount() const {
  absl::MutexLock lock(&mu_);
  return scans_;
}

}  // namespace tokenbroker
