#include "lib/upstream/egress.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace tokenbroker {
namespace {

constexpr size_t kMaxIdLength = 64;
constexpr size_t kMaxUrlLength = 2048;

}  // namespace

bool IsValidEgressId(absl::string_view id) {
  if (id.empty() || id.size() > kMaxIdLength) return false;
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') return false;
  }
  return true;
}

absl::Status ValidateProxyUrl(absl::string_view url) {
  if (url.size() > kMaxUrlLength) return absl::InvalidArgumentError(absl::StrCat("proxy URL longer than ", kMaxUrlLength, " bytes"));
  for (char c : url) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) return absl::InvalidArgumentError("proxy URL holds whitespace or a control character");
  }
  const size_t sep = url.find("://");
  if (sep == absl::string_view::npos) {
    return absl::InvalidArgumentError("proxy URL must be <scheme>://[user:password@]host[:port] with scheme http, "
                                      "https, socks5 or socks5h");
  }
  const std::string scheme = absl::AsciiStrToLower(url.substr(0, sep));
  if (scheme != "http" && scheme != "https" && scheme != "socks5" && scheme != "socks5h") {
    return absl::InvalidArgumentError("proxy URL scheme must be http, https, socks5 or socks5h");
  }
  absl::string_view rest = url.substr(sep + 3);
  if (absl::EndsWith(rest, "/")) rest.remove_suffix(1);
  if (rest.find_first_of("/?#") != absl::string_view::npos) {
    return absl::InvalidArgumentError("proxy URL must have no path, query or fragment");
  }
  // The credentials end at the last '@' (a password may hold one, percent-encoded or not).
  if (size_t at = rest.rfind('@'); at != absl::string_view::npos) rest = rest.substr(at + 1);
  absl::string_view host = rest;
  absl::string_view port;
  bool has_port = false;
  if (absl::StartsWith(rest, "[")) {  // [IPv6]:port
    const size_t close = rest.find(']');
    if (close == absl::string_view::npos) return absl::InvalidArgumentError("proxy URL has an unclosed [IPv6 address]");
    host = rest.substr(0, close + 1);
    absl::string_view after = rest.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') return absl::InvalidArgumentError("proxy URL has text after its [IPv6 address]");
      port = after.substr(1);
      has_port = true;
    }
  } else if (size_t colon = rest.rfind(':'); colon != absl::string_view::npos) {
    host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
    has_port = true;
  }
  if (host.empty() || host == "[]") return absl::InvalidArgumentError("proxy URL names no host");
  if (has_port) {
    int n = 0;
    if (!absl::SimpleAtoi(port, &n) || n < 1 || n > 65535) {
      return absl::InvalidArgumentError("proxy URL port must be a number from 1 to 65535");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::map<std::string, std::string>> ParseEgressFile(absl::string_view text, absl::string_view source) {
  std::map<std::string, std::string> out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || absl::StartsWith(line, "#")) continue;
    std::vector<absl::string_view> fields = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat(source, " line ", line_no, ": ", why));
    };
    if (fields.size() != 2) {
      return bad("want two fields, \"<egress id> <proxy url>\" (a proxy URL holds no spaces)");
    }
    // The id is not quoted when it is bad: a line written the wrong way round would show the URL.
    if (!IsValidEgressId(fields[0])) return bad(absl::StrCat("the egress id must be ", kEgressIdRule));
    const std::string id(fields[0]);
    if (absl::Status s = ValidateProxyUrl(fields[1]); !s.ok()) {
      return bad(absl::StrCat("egress ", id, ": ", s.message()));
    }
    if (out.contains(id)) return bad(absl::StrCat("egress ", id, " is defined twice"));
    if (out.size() >= kMaxEgresses) return bad(absl::StrCat("more than ", kMaxEgresses, " egresses"));
    out.emplace(id, std::string(fields[1]));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<EgressBook>> EgressBook::Open(const std::string& path) {
  std::unique_ptr<EgressBook> book(new EgressBook(path));
  if (path.empty()) return book;
  absl::StatusOr<bool> loaded = book->ReloadIfChanged();
  if (!loaded.ok()) return loaded.status();
  return book;
}

std::string EgressBook::Stamp() const {
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0) return "-";
  return absl::StrCat(st.st_size, ":", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec, ":", st.st_ino);
}

absl::StatusOr<bool> EgressBook::ReloadIfChanged() {
  if (path_.empty()) return false;
  std::string stamp = Stamp();
  if (stamp == stamp_) return false;
  stamp_ = std::move(stamp);
  std::ifstream in(path_, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--egress_file ", path_, " cannot be read"));
  std::ostringstream text;
  text << in.rdbuf();
  absl::StatusOr<std::map<std::string, std::string>> parsed = ParseEgressFile(text.str());
  if (!parsed.ok()) return parsed.status();
  absl::MutexLock lock(&mu_);
  proxies_ = *std::move(parsed);
  return true;
}

absl::StatusOr<EgressRoute> EgressBook::Route(absl::string_view id) const {
  if (id.empty()) return EgressRoute{};
  absl::MutexLock lock(&mu_);
  auto it = proxies_.find(std::string(id));
  if (it == proxies_.end()) {
    return absl::NotFoundError(absl::StrCat("egress ", id, " is not defined in ",
                                            path_.empty() ? "an --egress_file (none is given)" : "--egress_file"));
  }
  return EgressRoute{it->first, it->second};
}

std::string EgressBook::Problem(absl::string_view id) const {
  absl::StatusOr<EgressRoute> route = Route(id);
  return route.ok() ? "" : std::string(route.status().message());
}

std::vector<std::string> EgressBook::Ids() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const auto& [id, url] : proxies_) out.push_back(id);
  return out;
}

}  // namespace tokenbroker
