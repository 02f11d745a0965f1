#include "lib/tokens/account_json.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "lib/upstream/egress.h"
#include "simdjson.h"

namespace tokenbroker {
namespace {

// simdjson's DOM (one parse into a tape, then reads without copies): start-up parses every file
// of the folder, and this is ~10× nlohmann's speed (bench: footprint_bench).
using simdjson::dom::element;
using simdjson::dom::element_type;
using simdjson::dom::object;

static_assert(AccountJsonParser::kPadding >= simdjson::SIMDJSON_PADDING);

absl::Status FieldError(absl::string_view field, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("field '", field, "' must be ", want));
}

// The member `key` of `obj`; when it repeats, the last one (as a DOM parser that overwrites
// keeps it). Absent: nullopt. Objects here have a dozen members: a scan beats a map.
std::optional<element> Member(const object& obj, absl::string_view key) {
  const std::string_view want(key.data(), key.size());
  std::optional<element> found;
  for (const simdjson::dom::key_value_pair& kv : obj) {
    if (kv.key == want) found = kv.value;
  }
  return found;
}

bool AbsentOrNull(const std::optional<element>& e) { return !e.has_value() || e->is_null(); }

bool IsNumber(const element& e) {
  const element_type t = e.type();
  return t == element_type::INT64 || t == element_type::UINT64 || t == element_type::DOUBLE;
}

// A JSON number as an int64: a fraction is truncated, what is out of range saturates.
int64_t ToInt64(const element& e) {
  switch (e.type()) {
    case element_type::INT64: return e.get_int64().value_unsafe();
    case element_type::UINT64: return static_cast<int64_t>(e.get_uint64().value_unsafe());
    default: {
      const double d = e.get_double().value_unsafe();
      if (d >= 9.2e18) return std::numeric_limits<int64_t>::max();
      if (d <= -9.2e18) return std::numeric_limits<int64_t>::min();
      return static_cast<int64_t>(d);
    }
  }
}

double ToDouble(const element& e) {
  switch (e.type()) {
    case element_type::INT64: return static_cast<double>(e.get_int64().value_unsafe());
    case element_type::UINT64: return static_cast<double>(e.get_uint64().value_unsafe());
    default: return e.get_double().value_unsafe();
  }
}

// Reads an optional string member; null counts as absent. `path` names it in the error.
absl::Status OptString(const object& obj, absl::string_view key, absl::string_view path, std::string* out) {
  std::optional<element> e = Member(obj, key);
  if (AbsentOrNull(e)) return absl::OkStatus();
  std::string_view s;
  if (e->get_string().get(s) != simdjson::SUCCESS) return FieldError(path, "a string");
  out->assign(s.data(), s.size());
  return absl::OkStatus();
}

absl::Status OptBool(const object& obj, absl::string_view key, bool* out) {
  std::optional<element> e = Member(obj, key);
  if (AbsentOrNull(e)) return absl::OkStatus();
  if (e->get_bool().get(*out) != simdjson::SUCCESS) return FieldError(key, "true or false");
  return absl::OkStatus();
}

std::optional<absl::Time> ParseRfc3339(const std::string& text) {
  absl::Time t;
  std::string err;
  if (absl::ParseTime(absl::RFC3339_full, text, &t, &err)) return t;
  return std::nullopt;
}

absl::Status ReadModels(const element& models, absl::Time observed, AccountRecord& rec) {
  simdjson::dom::array list;
  if (models.get_array().get(list) != simdjson::SUCCESS) return FieldError("quota.models", "an array");
  for (const element& item : list) {
    object m;
    if (item.get_object().get(m) != simdjson::SUCCESS) return FieldError("quota.models[]", "objects");
    ModelQuota q;
    if (absl::Status s = OptString(m, "name", "quota.models[].name", &q.model); !s.ok()) return s;
    if (q.model.empty()) continue;
    if (std::optional<element> p = Member(m, "percentage"); p && IsNumber(*p)) {
      q.remaining_fraction = std::clamp(ToDouble(*p) / 100.0, 0.0, 1.0);
    }
    std::string reset;
    if (absl::Status s = OptString(m, "reset_time", "quota.models[].reset_time", &reset); !s.ok()) return s;
    if (!reset.empty()) q.reset_time = ParseRfc3339(reset);
    q.observed = observed;
    rec.quotas.push_back(std::move(q));
  }
  return absl::OkStatus();
}

absl::Status ReadQuota(const element& quota_member, AccountRecord& rec) {
  object quota;
  if (quota_member.get_object().get(quota) != simdjson::SUCCESS) return FieldError("quota", "an object");
  std::string tier;
  if (absl::Status s = OptString(quota, "subscription_tier", "quota.subscription_tier", &tier); !s.ok()) return s;
  rec.tier = ParseTier(tier);
  absl::Time observed = absl::InfinitePast();
  if (std::optional<element> lu = Member(quota, "last_updated"); lu && IsNumber(*lu)) {
    observed = absl::FromUnixSeconds(ToInt64(*lu));
  }
  if (std::optional<element> models = Member(quota, "models"); !AbsentOrNull(models)) {
    return ReadModels(*models, observed, rec);
  }
  return absl::OkStatus();
}

// The account file's fields, in the order their errors are checked. A new field: one more step
// here (and in AccountRecord).
absl::StatusOr<AccountRecord> ReadAccount(const std::string& id, const object& doc) {
  AccountRecord rec;
  rec.id = id;
  if (absl::Status s = OptString(doc, "email", "email", &rec.email); !s.ok()) return s;
  if (rec.email.empty()) rec.email = id;

  object token;
  if (std::optional<element> t = Member(doc, "token"); !t || t->get_object().get(token) != simdjson::SUCCESS) {
    return FieldError("token", "an object");
  }
  if (absl::Status s = OptString(token, "refresh_token", "token.refresh_token", &rec.refresh_token); !s.ok()) {
    return s;
  }
  if (rec.refresh_token.empty()) return FieldError("token.refresh_token", "a non-empty string");
  if (absl::Status s = OptString(token, "access_token", "token.access_token", &rec.access_token); !s.ok()) {
    return s;
  }
  if (std::optional<element> e = Member(token, "expiry_timestamp"); !AbsentOrNull(e)) {
    if (!IsNumber(*e)) return FieldError("token.expiry_timestamp", "a number of Unix seconds");
    rec.access_expiry = absl::FromUnixSeconds(ToInt64(*e));
  }
  if (rec.access_token.empty()) rec.access_expiry = absl::InfinitePast();
  if (absl::Status s = OptString(token, "project_id", "token.project_id", &rec.project_id); !s.ok()) return s;

  if (std::optional<element> quota = Member(doc, "quota"); !AbsentOrNull(quota)) {
    if (absl::Status s = ReadQuota(*quota, rec); !s.ok()) return s;
  }
  if (absl::Status s = OptBool(doc, "disabled", &rec.disabled); !s.ok()) return s;
  if (absl::Status s = OptString(doc, "disabled_reason", "disabled_reason", &rec.disabled_reason); !s.ok()) {
    return s;
  }
  if (absl::Status s = OptBool(doc, "suspended", &rec.suspended); !s.ok()) return s;
  if (rec.suspended) {
    // A suspended account is disabled whatever the file's "disabled" says; the message is the
    // reason's tail (SuspendedReason).
    rec.disabled = true;
    rec.suspension_message = SuspensionMessageOf(rec.disabled_reason).value_or(rec.disabled_reason);
    if (rec.disabled_reason.empty()) rec.disabled_reason = SuspendedReason("");
  }
  if (absl::Status s = OptBool(doc, "proxy_disabled", &rec.proxy_disabled); !s.ok()) return s;
  if (absl::Status s = OptString(doc, "egress", "egress", &rec.egress_id); !s.ok()) return s;
  if (!rec.egress_id.empty() && !IsValidEgressId(rec.egress_id)) {
    return FieldError("egress", absl::StrCat("an egress id of --egress_file: ", kEgressIdRule));
  }
  if (std::optional<element> pm = Member(doc, "protected_models"); !AbsentOrNull(pm)) {
    simdjson::dom::array list;
    if (pm->get_array().get(list) != simdjson::SUCCESS) return FieldError("protected_models", "an array of strings");
    for (const element& m : list) {
      std::string_view name;
      if (m.get_string().get(name) != simdjson::SUCCESS) return FieldError("protected_models", "an array of strings");
      rec.protected_models.emplace_back(name);
    }
  }
  return rec;
}

}  // namespace

AccountJsonParser::AccountJsonParser() : parser_(std::make_unique<simdjson::dom::parser>()) {}
AccountJsonParser::~AccountJsonParser() = default;

absl::StatusOr<AccountRecord> AccountJsonParser::ParsePadded(const std::string& id, absl::string_view text) {
  if (text.find_first_not_of(" \t\r\n") == absl::string_view::npos) {
    return absl::InvalidArgumentError("file is empty");
  }
  // A UTF-8 byte order mark is allowed before the JSON (simdjson leaves it to the caller).
  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);
  element root;
  if (parser_->parse(text.data(), text.size(), /*realloc_if_needed=*/false).get(root) != simdjson::SUCCESS) {
    return absl::InvalidArgumentError("not valid JSON");
  }
  object doc;
  if (root.get_object().get(doc) != simdjson::SUCCESS) {
    return absl::InvalidArgumentError("top level must be a JSON object");
  }
  return ReadAccount(id, doc);
}

absl::StatusOr<AccountRecord> AccountJsonParser::Parse(const std::string& id, absl::string_view text) {
  padded_.assign(text.data(), text.size());
  padded_.resize(text.size() + kPadding);
  return ParsePadded(id, absl::string_view(padded_.data(), text.size()));
}

absl::StatusOr<AccountRecord> ParseAccountJson(const std::string& id, absl::string_view text) {
  AccountJsonParser parser;
  return parser.Parse(id, text);
}

}  // namespace tokenbroker
