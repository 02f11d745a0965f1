#include "lib/selection/eligibility.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"

namespace tokenbroker {
namespace {

bool IsProtected(const AccountRecord& rec, const std::string& model) {
  return std::find(rec.protected_models.begin(), rec.protected_models.end(), model) != rec.protected_models.end();
}

std::string ScopeText(CooldownScope scope, absl::string_view family, absl::string_view group) {
  switch (scope) {
    case CooldownScope::kAccount: return "account";
    case CooldownScope::kFamily:
      return group.empty() ? absl::StrCat("model family ", family)
                           : absl::StrCat("model family ", family, " or quota group ", group);
    default: return "model";
  }
}

}  // namespace

Eligibility CheckEligibility(const AccountSnapshot& account, const EligibilityContext& ctx, bool explain) {
  const AccountRecord& rec = account.record;
  const SelectRequest& request = ctx.request;
  Eligibility out;
  if (rec.suspended) {
    out.verdict = Verdict::kSuspended;
    if (explain) {
      out.detail = rec.suspension_message.empty()
                       ? "suspended by Google (Terms of Service)"
                       : absl::StrCat("suspended by Google (Terms of Service): ", rec.suspension_message);
    }
  } else if (rec.disabled) {
    out.verdict = Verdict::kDisabled;
    if (explain) out.detail = rec.disabled_reason.empty() ? "disabled" : absl::StrCat("disabled: ", rec.disabled_reason);
  } else if (!rec.egress_problem.empty()) {
    out.verdict = Verdict::kDisabled;
    if (explain) out.detail = rec.egress_problem;
  } else if (rec.proxy_disabled) {
    out.verdict = Verdict::kProxyDisabled;
    if (explain) out.detail = "proxy_disabled is set in its account file";
  } else if (!rec.no_project_reason.empty()) {
    // The monitor found no Cloud Code project: a token without one fails upstream (and a made-up
    // project is worse), so the account waits for its onboarding.
    out.verdict = Verdict::kCooldown;
    if (explain) out.detail = absl::StrCat("no Cloud Code project: ", rec.no_project_reason);
  } else if (IsProtected(rec, request.model)) {
    out.verdict = Verdict::kProtected;
    if (explain) out.detail = absl::StrCat("model ", request.model, " is in its protected_models");
  } else if (std::optional<CooldownBlock> block =
                 ctx.cooldowns.Check(rec.id, request.model, ctx.now, FamilyRef{ctx.family, request.quota_group})) {
    out.verdict = Verdict::kCooldown;
    if (explain) {
      out.available_at = block->until;
      out.detail = block->probe_in_flight
                       ? absl::StrCat(block->reason, " until ", FormatTimestamp(block->until))
                       : absl::StrCat(ScopeText(block->scope, ctx.family, request.quota_group),
                                      " cooling down until ", FormatTimestamp(block->until), " (", block->reason,
                                      ")");
    }
  } else if (ctx.max_inflight_per_account > 0 && account.in_flight >= ctx.max_inflight_per_account) {
    out.verdict = Verdict::kLeaseCap;
    if (explain) {
      out.available_at = ctx.leases.EarliestExpiry(rec.id);
      out.detail = absl::StrCat(account.in_flight, " leases in flight (cap ", ctx.max_inflight_per_account, ")");
    }
  } else if (ctx.quota.Exhausted(rec, account.quota, request.model, ctx.now)) {
    out.verdict = Verdict::kExhausted;
    if (explain) out.detail = ctx.quota.ExhaustedDetail(rec, account.quota, request.model, ctx.now, &out.available_at);
  } else if (!request.exclude.empty() && request.exclude.contains(rec.id)) {
    out.verdict = Verdict::kRotatedAway;
    if (explain) out.detail = "excluded for this request (its token could not be refreshed)";
  } else if (request.caller_share != nullptr && request.caller_share->Blocks(rec.id, rec.tier)) {
    out.verdict = Verdict::kCallerShare;
    if (explain) out.detail = "the caller holds leases on as many accounts as its policy allows; not one of them";
  } else if (request.force_rotate && ctx.previous && *ctx.previous == rec.id) {
    out.verdict = Verdict::kRotatedAway;
    out.rotated_from = true;
    if (explain) out.detail = "force_rotate moves away from the account last used";
  }
  return out;
}

}  // namespace tokenbroker
