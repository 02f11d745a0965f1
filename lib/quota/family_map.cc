#include "lib/quota/family_map.h"

#include <algorithm>
#include <atomic>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace tokenbroker {
namespace {

std::vector<FamilyMap::Rule> DefaultRules() {
  return {{"*image*", "image"}, {"gemini*", "gemini"}, {"claude*", "3p"}, {"gpt*", "3p"},
          {"*claude*", "3p"},   {"*gpt*", "3p"},       {"*", "gemini"}};
}

bool PatternChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' || c == '/' ||
         c == '-' || c == '*';
}

bool FamilyChar(char c) {
  return absl::ascii_islower(static_cast<unsigned char>(c)) || absl::ascii_isdigit(static_cast<unsigned char>(c)) ||
         c == '.' || c == '_' || c == '-';
}

char Lower(char c) { return static_cast<char>(absl::ascii_tolower(static_cast<unsigned char>(c))); }

}  // namespace

bool GlobMatch(absl::string_view pattern, absl::string_view text) {
  // Iterative glob with one backtrack point (the last '*'): linear in practice, never exponential.
  size_t p = 0, t = 0;
  size_t star = absl::string_view::npos, resume = 0;
  while (t < text.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      resume = t;
    } else if (p < pattern.size() && pattern[p] == Lower(text[t])) {
      ++p;
      ++t;
    } else if (star != absl::string_view::npos) {
      p = star + 1;
      t = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

const std::shared_ptr<const FamilyMap>& FamilyMap::Default() {
  static const std::shared_ptr<const FamilyMap> kDefault(new FamilyMap(DefaultRules()));
  return kDefault;
}

absl::StatusOr<std::shared_ptr<const FamilyMap>> FamilyMap::Parse(absl::string_view text) {
  std::vector<Rule> rules;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    std::vector<absl::string_view> fields = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("model families line ", line_no,
                                                     ": expected \"<pattern> <family>\" (two fields), got ",
                                                     fields.size()));
    }
    const absl::string_view pattern = fields[0], family = fields[1];
    if (pattern.size() > 128 || !std::all_of(pattern.begin(), pattern.end(), PatternChar)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model families line ", line_no, ": pattern must be at most 128 characters of [A-Za-z0-9._:/-] and '*'"));
    }
    if (family.size() > kMaxFamilyName || !std::all_of(family.begin(), family.end(), FamilyChar)) {
      return absl::InvalidArgumentError(absl::StrCat("model families line ", line_no, ": family must be 1 to ",
                                                     kMaxFamilyName, " characters of [a-z0-9._-]"));
    }
    if (rules.size() >= kMaxRules) {
      return absl::InvalidArgumentError(
          absl::StrCat("model families line ", line_no, ": more than ", kMaxRules, " rules"));
    }
    rules.push_back({absl::AsciiStrToLower(pattern), std::string(family)});
  }
  for (Rule& r : DefaultRules()) rules.push_back(std::move(r));
  return std::shared_ptr<const FamilyMap>(new FamilyMap(std::move(rules)));
}

absl::StatusOr<std::shared_ptr<const FamilyMap>> FamilyMap::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--model_families_file ", path, ": cannot be read"));
  std::stringstream buf;
  buf << in.rdbuf();
  absl::StatusOr<std::shared_ptr<const FamilyMap>> map = Parse(buf.str());
  if (!map.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--model_families_file ", path, ": ", map.status().message()));
  }
  return map;
}

FamilyMap::FamilyMap(std::vector<Rule> rules) : rules_(std::move(rules)) {
  static std::atomic<uint64_t> next_id{1};
  id_ = next_id.fetch_add(1, std::memory_order_relaxed);
}

size_t FamilyMap::Match(absl::string_view model) const {
  for (size_t i = 0; i < rules_.size(); ++i) {
    if (GlobMatch(rules_[i].pattern, model)) return i;
  }
  return rules_.size();
}

absl::string_view FamilyMap::Of(absl::string_view model) const {
  // This thread's answers for one map at a time (a model name -> its rule's index). Bounded: models
  // come from callers, so past kMemoSize names the memo starts over (a hostile caller's made-up
  // models only cost it the glob matching again).
  constexpr size_t kMemoSize = 64;
  constexpr size_t kMaxMemoModel = 256;
  struct Memo {
    uint64_t map = 0;
    absl::flat_hash_map<std::string, size_t> rule;
  };
  thread_local Memo memo;
  if (memo.map != id_) {
    memo.map = id_;
    memo.rule.clear();
  }
  size_t i;
  if (auto it = memo.rule.find(model); it != memo.rule.end()) {
    i = it->second;
  } else {
    i = Match(model);
    if (memo.rule.size() >= kMemoSize) memo.rule.clear();
    if (model.size() <= kMaxMemoModel) memo.rule.emplace(model, i);
  }
  return i < rules_.size() ? absl::string_view(rules_[i].family) : absl::string_view("gemini");
}

absl::string_view FamilyMap::OfGroup(absl::string_view group) const {
  for (const Rule& r : rules_) {
    if (r.family == group) return r.family;
  }
  return Of(group);
}

}  // namespace tokenbroker
