#include "lib/broker/token_issuer.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"

namespace tokenbroker {
namespace {

// How long a call waits for one account's token refresh before it tries another account (the
// refresh goes on in the background): a third of what is left of the caller's deadline, between
// 100 ms and 5 s.
absl::Time RefreshGiveUp(absl::Time call_deadline, absl::Time now) {
  absl::Duration budget = absl::Seconds(5);
  if (call_deadline != absl::InfiniteFuture()) {
    budget = std::clamp((call_deadline - now) / 3, absl::Milliseconds(100), absl::Seconds(5));
  }
  return now + budget;
}

}  // namespace

struct TokenIssuer::Pending {
  IssueRequest request;
  Done done;
  int attempt = 0;
  absl::Status last_error;
  absl::Time deadline = absl::InfinitePast();  // end of max_wait; in the past: no waiting
  // Accounts whose token is in trouble (TokenManager::Troubled) are tried only when no other
  // account is eligible: then this is set.
  bool include_troubled = false;
  // Accounts left out because their token was short-lived (they come back with include_troubled).
  std::vector<std::string> short_lived;

  // Set when the issuer chose the key: it forgets it when the call ends.
  WaitQueue* forget_key = nullptr;

  // Under caller policies: the call's policy, whether it holds a reservation (a lease being
  // chosen for it) and whether it counts as waiting.
  CallerAdmission* admission = nullptr;
  std::optional<CallerGrant> grant;
  bool reserved = false;
  bool waiting = false;

  // While the chosen account's token is being acquired: the selection, and whether the call may
  // still wait. Kept here so the token callback carries one pointer (no allocation, no copies).
  std::optional<Selection> chosen;
  bool may_wait = false;

  bool cancelled() const { return request.cancelled && request.cancelled(); }
  // Gives back the reservation (no lease came of it).
  void Unreserve() {
    if (!reserved) return;
    reserved = false;
    request.select.caller_share.reset();
    admission->Cancel(*grant->policy);
  }
  // Commits the fleet refused because of the caller's account limits (another replica's lease).
  int commit_refusals = 0;
  void Finish(absl::StatusOr<Issued> result) {
    Unreserve();
    if (waiting) admission->StopWaiting(*grant->policy);
    if (forget_key != nullptr) forget_key->Forget(request.key);
    std::move(done)(std::move(result));
  }
};

TokenIssuer::TokenIssuer(TokenIssuerOptions options, AccountPool& pool, TokenManager& tokens, const Clock& clock)
    : options_(std::move(options)), pool_(pool), tokens_(tokens), clock_(clock), waits_(clock) {}

TokenIssuer::~TokenIssuer() { Shutdown(); }

void TokenIssuer::Issue(IssueRequest request, Done done) {
  auto p = std::make_unique<Pending>();
  if (request.max_wait > absl::ZeroDuration()) p->deadline = clock_.Now() + request.max_wait;
  p->request = std::move(request);
  p->done = std::move(done);
  if (p->request.key == nullptr) {
    p->request.key = p.get();  // stable while the call lives; nobody else can Cancel() it
    p->forget_key = &waits_;
  }
  if (admission_ != nullptr) {
    absl::StatusOr<std::optional<CallerGrant>> grant =
        admission_->Admit(p->request.select.caller, p->request.select.model);
    if (!grant.ok()) {
      p->Finish(grant.status());
      return;
    }
    if (*grant) {
      p->admission = admission_;
      p->grant = **std::move(grant);
      p->request.priority = static_cast<int>(p->grant->policy->priority);
    }
  }
  Dispatch(std::move(p), /*may_wait=*/true);
}

void TokenIssuer::Dispatch(std::unique_ptr<Pending> p, bool may_wait) {
  // Selection runs here (the hot path `make bench` measures) unless it needs a round trip to the
  // shared state, a session claimed fleet-wide: Attempt then hands the call to the selection
  // threads, so no caller's thread (a gRPC callback thread) waits on Redis.
  Attempt(std::move(p), may_wait, /*on_worker=*/false);
}

void TokenIssuer::HandOver(std::unique_ptr<Pending> p, bool may_wait) {
  bool overloaded = false;
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_ && queue_.size() < options_.max_queued) {
      queue_.push_back([this, p = std::move(p), may_wait]() mutable { Attempt(std::move(p), may_wait, true); });
      if (workers_.empty()) {
        for (int i = 0; i < std::max(1, options_.selection_workers); ++i) {
          workers_.emplace_back([this] { WorkerLoop(); });
        }
      }
      return;
    }
    overloaded = !stopping_;
  }
  if (overloaded) {
    p->Finish(absl::UnavailableError("the broker is overloaded: too many GetToken calls wait for selection"));
    return;
  }
  // Shutting down: the selection threads are going; the last tries run here.
  Attempt(std::move(p), may_wait, /*on_worker=*/true);
}

void TokenIssuer::WorkerLoop() {
  while (true) {
    absl::AnyInvocable<void() &&> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](TokenIssuer* t) ABSL_NO_THREAD_SAFETY_ANALYSIS { return t->stopping_ || !t->queue_.empty(); }, this));
      if (queue_.empty()) return;  // stopping, and every queued call has had its try
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    std::move(task)();
  }
}

void TokenIssuer::Shutdown() {
  // Parked calls get their last try first (they may queue for the selection threads).
  waits_.Shutdown();
  std::vector<std::thread> workers;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    workers.swap(workers_);
  }
  for (std::thread& t : workers) t.join();
}

void TokenIssuer::Attempt(std::unique_ptr<Pending> p, bool may_wait, bool on_worker) {
  if (p->cancelled()) {
    // Nobody is there to take a token: no lease is issued (nor the half-open probe taken).
    p->Finish(absl::CancelledError("the caller went away"));
    return;
  }
  const absl::Time now = clock_.Now();
  if (p->grant && !p->reserved) {
    if (!on_worker && admission_->remote()) {
      HandOver(std::move(p), may_wait);  // the fleet's caller ledger is a round trip away
      return;
    }
    // The caller's own limits first: a call over them takes no lease and no account from anyone.
    absl::StatusOr<std::shared_ptr<const CallerShare>> share = admission_->Reserve(*p->grant->policy);
    if (!share.ok()) {
      absl::Status refused = share.status();
      if (may_wait && now < p->deadline) {
        // Its own leases may end soon: wait for a report (Notify) or retry_after.
        refused = Park(p, std::min(p->deadline, now + p->grant->policy->retry_after));
        if (refused.ok()) return;
      }
      p->Finish(refused);
      return;
    }
    p->reserved = true;
    p->request.select.caller_share = *std::move(share);
  }
  // Accounts whose token cannot be had now (refresh failing or slow) or only short-lived are
  // tried after every other account (issue 11: fail over instead of waiting on them).
  const absl::flat_hash_map<std::string, TokenTroubleInfo> trouble =
      p->include_troubled ? absl::flat_hash_map<std::string, TokenTroubleInfo>() : tokens_.Troubled();
  // Off a selection thread, only a selection that needs no round trip to the shared state.
  auto select = [&](const SelectRequest& r) -> std::optional<absl::StatusOr<Selection>> {
    if (on_worker || pool_.shared_state() == nullptr) return pool_.Select(r);
    return pool_.SelectHere(r);
  };
  std::optional<absl::StatusOr<Selection>> chosen =
      trouble.empty() ? select(p->request.select) : std::optional<absl::StatusOr<Selection>>();
  if (!trouble.empty()) {
    SelectRequest request = p->request.select;
    for (const auto& [id, info] : trouble) request.exclude.insert(id);
    chosen = select(request);
    if (chosen && !chosen->ok()) {
      // Nothing else is eligible: the troubled accounts after all (a short-lived token beats none;
      // a failing one fails fast; a slow one may finish in time).
      p->include_troubled = true;
      for (const std::string& id : p->short_lived) p->request.select.exclude.erase(id);
      Attempt(std::move(p), may_wait, on_worker);
      return;
    }
  }
  if (!chosen) {
    HandOver(std::move(p), may_wait);
    return;
  }
  absl::StatusOr<Selection>& selection = *chosen;
  if (!selection.ok()) {
    NoSelection(std::move(p), may_wait, selection.status(), now);
    return;
  }
  const std::string account_id = selection->account_id;
  const absl::Time give_up = RefreshGiveUp(p->request.call_deadline, now);
  p->chosen.emplace(*std::move(selection));
  p->may_wait = may_wait;
  tokens_.Acquire(account_id, give_up, [this, p = std::move(p)](absl::StatusOr<AccessToken> token) mutable {
    OnToken(std::move(p), std::move(token));
  });
}

void TokenIssuer::NoSelection(std::unique_ptr<Pending> p, bool may_wait, absl::Status status, absl::Time now) {
  const std::optional<absl::Duration> frees = RetryDelay(status);
  if (absl::IsResourceExhausted(status) && !frees && !p->last_error.ok()) {
    // The accounts left out because their tokens could not be had are the real cause, and
    // nothing frees by itself.
    status = absl::UnavailableError(absl::StrCat("no account with a valid token for model ", p->request.select.model,
                                                 "; last error: ", p->last_error.message()));
  } else if (absl::IsResourceExhausted(status) && may_wait && now < p->deadline) {
    // Wait (without a thread) until the earliest account frees, a report frees one, or max_wait
    // ends; then every account gets a fresh chance.
    absl::Time next = p->deadline;
    if (frees) next = std::min(next, now + *frees);
    p->request.select.exclude.clear();
    p->short_lived.clear();
    p->include_troubled = false;
    p->attempt = 0;
    p->last_error = absl::OkStatus();
    absl::Status parked = Park(p, next);
    if (parked.ok()) return;
    status = parked;
  } else if (absl::IsResourceExhausted(status) && !p->last_error.ok()) {
    // Other accounts are cooling and will free: RESOURCE_EXHAUSTED with their RetryInfo, saying
    // why the remaining ones were skipped.
    status = NoAccountAvailableError(
        absl::StrCat(status.message(), "; accounts were skipped because their tokens could not be had (",
                     p->last_error.message(), ")"),
        p->request.select.model, frees);
  }
  p->Finish(status);
}

absl::Status TokenIssuer::Park(std::unique_ptr<Pending>& p, absl::Time next) {
  if (p->grant) {
    // A waiting call holds no reservation: it must not keep its caller's other calls out.
    p->Unreserve();
    if (!p->waiting) {
      const CallerPolicy& policy = *p->grant->policy;
      if (!admission_->StartWaiting(policy)) {
        return admission_->LimitError(policy, "max_waiting",
                                      absl::StrCat("caller ", policy.name, " already has ", policy.max_waiting,
                                                   " calls waiting (its max_waiting)"));
      }
      p->waiting = true;
    }
  }
  const WaitQueue::Key key = p->request.key;
  const int priority = p->request.priority;
  waits_.Park(
      key, next,
      [this, p = std::move(p)](WaitQueue::Wake why) mutable {
        if (why == WaitQueue::Wake::kCancelled) {
          p->Finish(absl::CancelledError("the caller went away while waiting"));
          return;
        }
        Dispatch(std::move(p), /*may_wait=*/why != WaitQueue::Wake::kFinal);
      },
      priority);
  return absl::OkStatus();
}

void TokenIssuer::OnToken(std::unique_ptr<Pending> p, absl::StatusOr<AccessToken> token) {
  const bool may_wait = p->may_wait;
  const Selection& selection = *p->chosen;
  if (token.ok() && token->below_min_ttl && !p->include_troubled) {
    // Shorter-lived than min_token_ttl: any other eligible account first.
    pool_.ReleaseLease(selection.lease_id);
    p->request.select.exclude.insert(selection.account_id);
    p->short_lived.push_back(selection.account_id);
    Dispatch(std::move(p), may_wait);
    return;
  }
  if (!token.ok()) {
    pool_.ReleaseLease(selection.lease_id);
    if (absl::IsDeadlineExceeded(token.status())) {
      // Its refresh is slow: other accounts now (Troubled() lists it until the refresh ends).
      p->include_troubled = false;
      Dispatch(std::move(p), may_wait);
      return;
    }
    if (p->attempt + 1 < options_.max_attempts) {
      ++p->attempt;
      p->last_error = token.status();
      p->request.select.exclude.insert(selection.account_id);
      Dispatch(std::move(p), may_wait);
      return;
    }
    p->Finish(absl::UnavailableError(absl::StrCat("no valid token could be obtained for model ",
                                                  p->request.select.model, "; last error: ",
                                                  token.status().message())));
    return;
  }
  if (p->cancelled()) {
    // The caller left while the token was being fetched: the lease goes back at once.
    pool_.ReleaseLease(selection.lease_id);
    p->Finish(absl::CancelledError("the caller went away"));
    return;
  }
  Issued issued{*std::move(p->chosen), *std::move(token)};
  p->chosen.reset();
  if (p->reserved) {
    const CallerPolicy& policy = *p->grant->policy;
    CallerAdmission::Committed c =
        admission_->Commit(policy, issued.selection.lease_id, issued.selection.account_id, issued.selection.tier);
    if (!c.refused_limit.empty()) {
      // Another replica's lease took the caller's last new account: one it holds, or the refusal.
      pool_.ReleaseLease(issued.selection.lease_id);
      if (++p->commit_refusals < options_.max_attempts) {
        p->request.select.caller_share = std::move(c.retry_share);
        Dispatch(std::move(p), may_wait);
        return;
      }
      p->Finish(admission_->LimitError(policy, c.refused_limit, c.detail));
      return;
    }
    p->reserved = false;
    issued.caller_leases_left = c.leases_left;
    issued.caller_policy = policy.name;
  }
  p->Finish(std::move(issued));
}

}  // namespace tokenbroker
