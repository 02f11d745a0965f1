#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tokenbroker {

// Which quota family a model draws from (docs/ARCHITECTURE.md "Quota"): the models of one family
// share an account's buckets (the groups of retrieveUserQuotaSummary: "gemini", "3p") and its
// family-wide limits (a weekly 429 on claude-sonnet spends claude-opus too). A list of rules
// "<pattern> <family>", first match wins; a pattern is a case-insensitive glob over the model name
// where '*' matches any run of characters. The defaults:
//
//   *image*  image     gemini-3-pro-image, imagen-4 (image generation has its own quota)
//   gemini*  gemini
//   claude*  3p        third-party models share the "3p" buckets
//   gpt*     3p
//   *claude* 3p
//   *gpt*    3p
//   *        gemini    anything else
//
// An operator's file (--model_families_file) puts its rules before the defaults, so it overrides
// what it names and leaves the rest. Immutable once built; cheap to query (no allocation).
class FamilyMap {
 public:
  struct Rule {
    std::string pattern;  // lower-case glob
    std::string family;
  };
  static constexpr size_t kMaxRules = 256;
  static constexpr size_t kMaxFamilyName = 64;

  // The built-in rules only.
  static const std::shared_ptr<const FamilyMap>& Default();
  // The rules of a file's text followed by the defaults. One rule a line: "<pattern> <family>";
  // blank lines and lines starting with '#' are skipped. INVALID_ARGUMENT naming the line and the
  // field for anything else: a pattern of model-name characters [A-Za-z0-9._:/-] and '*', at most
  // 128 bytes; a family of [a-z0-9._-], at most kMaxFamilyName bytes; at most kMaxRules rules.
  static absl::StatusOr<std::shared_ptr<const FamilyMap>> Parse(absl::string_view text);
  // Parse on a file's content; NOT_FOUND / the errno text when it cannot be read. Errors name the path.
  static absl::StatusOr<std::shared_ptr<const FamilyMap>> Load(const std::string& path);

  // The family of `model` (the first rule that matches; the defaults end with a catch-all).
  // Called several times per GetToken: each thread remembers the answers for the last few models
  // it asked this map about (a few hundred instructions of glob matching per call otherwise).
  absl::string_view Of(absl::string_view model) const;
  // The family a bucket group of retrieveUserQuotaSummary limits: the group id itself when some
  // rule names it as a family ("gemini", "3p"), else the family of the id read as a model name.
  absl::string_view OfGroup(absl::string_view group) const;

  const std::vector<Rule>& rules() const { return rules_; }

 private:
  explicit FamilyMap(std::vector<Rule> rules);
  // The index of the first rule matching `model`; rules_.size() when none does.
  size_t Match(absl::string_view model) const;

  std::vector<Rule> rules_;
  // Unique per map made in this process: what a thread's memo of answers is keyed by.
  uint64_t id_;
};

// A case-insensitive glob match: '*' matches any run (also empty); every other character itself.
// `pattern` must be lower-case.
bool GlobMatch(absl::string_view pattern, absl::string_view text);

}  // namespace tokenbroker
