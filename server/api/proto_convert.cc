#include "server/api/proto_convert.h"

#include "lib/common/safe_text.h"
#include "lib/common/upstream_error.h"

namespace tokenbroker {

v1::Tier ToProto(Tier tier) {
  switch (tier) {
    case Tier::kFree: return v1::TIER_FREE;
    case Tier::kPro: return v1::TIER_PRO;
    case Tier::kUltra: return v1::TIER_ULTRA;
    case Tier::kUnknown: break;
  }
  return v1::TIER_UNSPECIFIED;
}

v1::Verdict ToProto(Verdict verdict) {
  switch (verdict) {
    case Verdict::kChosen: return v1::VERDICT_CHOSEN;
    case Verdict::kRankedLower: return v1::VERDICT_RANKED_LOWER;
    case Verdict::kDisabled: return v1::VERDICT_DISABLED;
    case Verdict::kProxyDisabled: return v1::VERDICT_PROXY_DISABLED;
    case Verdict::kProtected: return v1::VERDICT_PROTECTED;
    case Verdict::kCooldown: return v1::VERDICT_COOLDOWN;
    case Verdict::kExhausted: return v1::VERDICT_EXHAUSTED;
    case Verdict::kLeaseCap: return v1::VERDICT_LEASE_CAP;
    case Verdict::kRotatedAway: return v1::VERDICT_ROTATED_AWAY;
    case Verdict::kSuspended: return v1::VERDICT_SUSPENDED;
    case Verdict::kCallerShare: return v1::VERDICT_CALLER_SHARE;
  }
  return v1::VERDICT_UNSPECIFIED;
}

v1::SelectionPolicy ToProto(Policy policy) {
  switch (policy) {
    case Policy::kBalance: return v1::SELECTION_POLICY_BALANCE;
    case Policy::kFillFirst: return v1::SELECTION_POLICY_FILL_FIRST;
    case Policy::kResetSoonest: return v1::SELECTION_POLICY_RESET_SOONEST;
    case Policy::kRoundRobin: return v1::SELECTION_POLICY_ROUND_ROBIN;
  }
  return v1::SELECTION_POLICY_UNSPECIFIED;
}

void ToProto(absl::Time t, google::protobuf::Timestamp* out) {
  const int64_t nanos = absl::ToUnixNanos(t);
  int64_t seconds = nanos / 1'000'000'000;
  int64_t rem = nanos % 1'000'000'000;
  if (rem < 0) {
    rem += 1'000'000'000;
    --seconds;
  }
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(rem));
}

absl::Duration FromProto(const google::protobuf::Duration& d) {
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

void ToProto(absl::Duration d, google::protobuf::Duration* out) {
  const int64_t seconds = absl::ToInt64Seconds(d);
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(d - absl::Seconds(seconds))));
}

IssueRequest FromProto(const v1::GetTokenRequest& request) {
  IssueRequest issue;
  issue.select.model = request.model();
  issue.select.session_id = request.session_id();
  issue.select.force_rotate = request.force_rotate();
  issue.select.quota_group = request.quota_group();
  if (request.has_max_wait()) issue.max_wait = FromProto(request.max_wait());
  return issue;
}

void ToProto(const Issued& issued, v1::GetTokenResponse* out) {
  const Selection& selection = issued.selection;
  out->set_access_token(issued.token.token);
  out->set_account_id(selection.account_id);
  out->set_email(selection.email);
  out->set_project_id(selection.project_id);
  ToProto(issued.token.expiry, out->mutable_expire_time());
  out->set_tier(ToProto(selection.tier));
  out->set_lease_id(selection.lease_id);
  out->set_quota_decision(ToProto(selection.quota_decision));
  if (selection.remaining_fraction) out->set_remaining_fraction(*selection.remaining_fraction);
  out->set_below_min_token_ttl(issued.token.below_min_ttl);
  out->set_model_family(selection.model_family);
  if (selection.credits_exhausted_until) {
    out->set_credits_exhausted(true);
    ToProto(*selection.credits_exhausted_until, out->mutable_credits_exhausted_until());
  }
  if (issued.caller_leases_left) out->set_caller_leases_left(*issued.caller_leases_left);
  out->set_caller_policy(issued.caller_policy);
  out->set_egress_id(selection.egress_id);
}

namespace {

absl::Time FromProto(const google::protobuf::Timestamp& t) {
  return absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
}

Tier FromProto(v1::Tier tier) {
  switch (tier) {
    case v1::TIER_ULTRA: return Tier::kUltra;
    case v1::TIER_PRO: return Tier::kPro;
    case v1::TIER_FREE: return Tier::kFree;
    default: return Tier::kUnknown;
  }
}

}  // namespace

void ToProto(const QuotaObservation& o, v1::QuotaObservation* p) {
  p->set_account_id(o.account_id);
  p->set_model(o.model);
  p->set_remaining_fraction(o.remaining_fraction);
  if (o.reset_time) ToProto(*o.reset_time, p->mutable_reset_time());
  ToProto(o.observed, p->mutable_observed_time());
  p->set_tier(ToProto(o.tier));
  p->set_project_id(o.project_id);
  p->set_forbidden(o.forbidden);
  p->set_bucket_id(o.bucket);
  p->set_family(o.family);
  p->set_suspended(o.suspended);
  p->set_suspension_message(o.suspension_message);
  p->set_no_project_reason(o.no_project_reason);
  switch (o.source) {
    case QuotaSource::kAvailableModels: p->set_source(v1::QUOTA_SOURCE_AVAILABLE_MODELS); break;
    case QuotaSource::kQuotaSummary: p->set_source(v1::QUOTA_SOURCE_QUOTA_SUMMARY); break;
    case QuotaSource::kUserQuota: p->set_source(v1::QUOTA_SOURCE_USER_QUOTA); break;
    case QuotaSource::kUnspecified: p->set_source(v1::QUOTA_SOURCE_UNSPECIFIED); break;
  }
}

QuotaObservation FromProto(const v1::QuotaObservation& p) {
  QuotaObservation o;
  o.account_id = p.account_id();
  o.model = p.model();
  o.remaining_fraction = p.remaining_fraction();
  if (p.has_reset_time()) o.reset_time = FromProto(p.reset_time());
  o.observed = FromProto(p.observed_time());
  o.tier = FromProto(p.tier());
  o.project_id = p.project_id();
  o.forbidden = p.forbidden();
  o.bucket = p.bucket_id();
  o.family = p.family();
  o.suspended = p.suspended();
  // A monitor's words: bounded and escaped like any upstream text.
  o.suspension_message = SafeText(p.suspension_message(), 2 * kMaxUpstreamField);
  // The monitor's text, shown to operators: bounded and escaped like any text from outside.
  o.no_project_reason = SafeText(p.no_project_reason(), 256);
  switch (p.source()) {
    case v1::QUOTA_SOURCE_AVAILABLE_MODELS: o.source = QuotaSource::kAvailableModels; break;
    case v1::QUOTA_SOURCE_QUOTA_SUMMARY: o.source = QuotaSource::kQuotaSummary; break;
    case v1::QUOTA_SOURCE_USER_QUOTA: o.source = QuotaSource::kUserQuota; break;
    default: o.source = QuotaSource::kUnspecified; break;
  }
  return o;
}

void ToProto(const AccountView& view, v1::Account* out) {
  out->set_account_id(view.account_id);
  out->set_email(view.email);
  out->set_tier(ToProto(view.tier));
  out->set_project_id(view.project_id);
  out->set_state(view.suspended        ? v1::ACCOUNT_STATE_SUSPENDED
                 : view.disabled       ? v1::ACCOUNT_STATE_DISABLED
                 : view.proxy_disabled ? v1::ACCOUNT_STATE_PROXY_DISABLED
                                       : v1::ACCOUNT_STATE_ENABLED);
  out->set_disabled_reason(view.disabled_reason);
  for (const std::string& m : view.protected_models) out->add_protected_models(m);
  if (view.token_expiry) ToProto(*view.token_expiry, out->mutable_token_expire_time());
  if (view.last_used) ToProto(*view.last_used, out->mutable_last_used_time());
  for (const ModelQuota& q : view.quotas) {
    v1::ModelQuota* mq = out->add_quotas();
    mq->set_model(q.model);
    mq->set_remaining_fraction(q.remaining_fraction);
    if (q.reset_time) ToProto(*q.reset_time, mq->mutable_reset_time());
  }
  for (const BucketQuota& b : view.buckets) {
    v1::QuotaBucket* pb = out->add_buckets();
    pb->set_bucket_id(b.bucket);
    pb->set_family(b.family);
    pb->set_remaining_fraction(b.remaining_fraction);
    if (b.reset_time) ToProto(*b.reset_time, pb->mutable_reset_time());
    ToProto(b.observed, pb->mutable_observed_time());
  }
  out->set_suspension_message(view.suspension_message);
  out->set_bound_sessions(view.bound_sessions);
  for (const CooldownView& c : view.cooldowns) {
    v1::Cooldown* pc = out->add_cooldowns();
    if (c.family) {
      pc->set_family(c.model);
    } else {
      pc->set_model(c.model);
    }
    ToProto(c.until, pc->mutable_end_time());
    pc->set_reason(c.reason);
    pc->set_half_open(c.half_open);
  }
  out->set_validation_url(view.validation_url);
  out->set_inflight_leases(view.in_flight);
  out->set_failure_streak(view.failure_streak);
  if (view.credits_exhausted_until) ToProto(*view.credits_exhausted_until, out->mutable_credits_exhausted_until());
  out->set_egress_id(view.egress_id);
}

v1::QuotaDecision ToProto(QuotaDecision decision) {
  switch (decision) {
    case QuotaDecision::kProceed: return v1::QUOTA_DECISION_PROCEED;
    case QuotaDecision::kLow: return v1::QUOTA_DECISION_LOW;
    case QuotaDecision::kExhausted: return v1::QUOTA_DECISION_EXHAUSTED;
    case QuotaDecision::kUnknown: break;
  }
  return v1::QUOTA_DECISION_UNSPECIFIED;
}

v1::CooldownScope ToProto(CooldownScope scope) {
  switch (scope) {
    case CooldownScope::kModel: return v1::COOLDOWN_SCOPE_MODEL;
    case CooldownScope::kAccount: return v1::COOLDOWN_SCOPE_ACCOUNT;
    case CooldownScope::kFamily: return v1::COOLDOWN_SCOPE_FAMILY;
    case CooldownScope::kNone: break;
  }
  return v1::COOLDOWN_SCOPE_UNSPECIFIED;
}

void ToProto(const Explanation& explanation, v1::ExplainSelectionResponse* out) {
  out->set_chosen_account_id(explanation.chosen_account_id);
  out->set_from_session(explanation.from_session);
  out->set_policy(ToProto(explanation.policy));
  for (const AccountVerdict& v : explanation.accounts) {
    v1::AccountVerdict* pv = out->add_accounts();
    pv->set_account_id(v.account_id);
    pv->set_email(v.email);
    pv->set_tier(ToProto(v.tier));
    pv->set_verdict(ToProto(v.verdict));
    pv->set_detail(v.detail);
    pv->set_rank(v.rank);
    if (v.available_at) ToProto(*v.available_at, pv->mutable_available_time());
    if (v.observed_fraction) pv->set_observed_fraction(*v.observed_fraction);
    if (v.estimated_fraction) pv->set_estimated_fraction(*v.estimated_fraction);
    pv->set_binding_quota(v.binding_quota);
  }
}

}  // namespace tokenbroker
