#include "server/runtime/command_line.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"

namespace tokenbroker {
namespace {

constexpr int kMaxFlagfileDepth = 8;

// The program's own flags: Abseil's built-in ones (--flagfile, --helpfull, ...) are left out;
// --flagfile and --help are handled here.
std::map<std::string, absl::CommandLineFlag*> ProgramFlags() {
  std::map<std::string, absl::CommandLineFlag*> out;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (flag->IsRetired()) continue;
    const std::string file = flag->Filename();
    if (absl::StrContains(file, "absl/")) continue;
    out.emplace(std::string(name), flag);
  }
  return out;
}

std::string TypeName(const absl::CommandLineFlag& flag) {
  if (flag.IsOfType<bool>()) return "bool";
  if (flag.IsOfType<int>() || flag.IsOfType<int64_t>() || flag.IsOfType<uint32_t>() || flag.IsOfType<uint64_t>()) {
    return "integer";
  }
  if (flag.IsOfType<double>() || flag.IsOfType<float>()) return "number";
  if (flag.IsOfType<absl::Duration>()) return "duration";
  if (flag.IsOfType<std::string>()) return "string";
  return "value";
}

std::string Expected(const absl::CommandLineFlag& flag) {
  const std::string type = TypeName(flag);
  if (type == "bool") return "true or false";
  if (type == "integer") return "an integer";
  if (type == "number") return "a number";
  if (type == "duration") return "a duration such as 500ms, 10s, 5m or 1h30m";
  return "";
}

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string Normalized(absl::string_view s) {
  std::string out = absl::AsciiStrToLower(s);
  std::replace(out.begin(), out.end(), '-', '_');
  return out;
}

std::vector<std::string> Names(const std::map<std::string, absl::CommandLineFlag*>& flags) {
  std::vector<std::string> names;
  for (const auto& [name, flag] : flags) names.push_back(name);
  names.push_back("flagfile");
  names.push_back("help");
  return names;
}

absl::Status Unknown(absl::string_view name, const std::map<std::string, absl::CommandLineFlag*>& flags) {
  std::string message = absl::StrCat("unknown flag --", name);
  if (std::string close = ClosestMatch(name, Names(flags)); !close.empty()) {
    absl::StrAppend(&message, " (did you mean --", close, "?)");
  }
  absl::StrAppend(&message, "; --help lists every flag");
  return absl::InvalidArgumentError(message);
}

absl::Status ReadFlagfile(const std::string& path, int depth, std::vector<std::string>* out);

// Expands --flagfile arguments in place, recursively.
absl::Status Expand(const std::vector<std::string>& in, int depth, std::vector<std::string>* out) {
  for (size_t i = 0; i < in.size(); ++i) {
    const std::string& arg = in[i];
    if (arg == "--") {
      out->insert(out->end(), in.begin() + static_cast<long>(i), in.end());
      return absl::OkStatus();
    }
    absl::string_view body = arg;
    if (!absl::ConsumePrefix(&body, "--")) absl::ConsumePrefix(&body, "-");
    if (body.size() == arg.size() || !(body == "flagfile" || absl::StartsWith(body, "flagfile="))) {
      out->push_back(arg);
      continue;
    }
    std::string path;
    if (body == "flagfile") {
      if (i + 1 >= in.size() || absl::StartsWith(in[i + 1], "--")) {
        return absl::InvalidArgumentError("flag --flagfile needs a value: --flagfile=FILE");
      }
      path = in[++i];
    } else {
      path = std::string(body.substr(sizeof("flagfile=") - 1));
    }
    if (absl::Status s = ReadFlagfile(path, depth, out); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ReadFlagfile(const std::string& path, int depth, std::vector<std::string>* out) {
  if (depth >= kMaxFlagfileDepth) {
    return absl::InvalidArgumentError(absl::StrCat("--flagfile: ", path, ": flag files nested too deep"));
  }
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--flagfile: cannot read ", path));
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view l = absl::StripAsciiWhitespace(line);
    if (l.empty() || l[0] == '#') continue;
    lines.emplace_back(l);
  }
  return Expand(lines, depth + 1, out);
}

}  // namespace

std::string ClosestMatch(absl::string_view word, const std::vector<std::string>& candidates) {
  const std::string w = Normalized(word);
  if (w.empty()) return "";
  std::string best;
  size_t best_distance = std::string::npos;
  for (const std::string& c : candidates) {
    const std::string n = Normalized(c);
    size_t d = EditDistance(w, n);
    // "--accounts" for --accounts_dir, "--drain" for --drain_timeout: a part of the name.
    if (d > 0 && w.size() >= 4 && (absl::StrContains(n, w) || absl::StrContains(w, n))) d = std::min<size_t>(d, 2);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  const size_t allowed = std::max<size_t>(2, w.size() / 4);
  return best_distance <= allowed ? best : "";
}

absl::StatusOr<ParsedCommandLine> ParseFlags(const std::vector<std::string>& raw, bool allow_positional) {
  std::vector<std::string> args;
  if (absl::Status s = Expand(raw, 0, &args); !s.ok()) return s;
  const std::map<std::string, absl::CommandLineFlag*> flags = ProgramFlags();
  ParsedCommandLine out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--") {
      out.positional.insert(out.positional.end(), args.begin() + static_cast<long>(i) + 1, args.end());
      break;
    }
    absl::string_view body = arg;
    if (arg.size() < 2 || arg[0] != '-' || !(absl::ConsumePrefix(&body, "--") || absl::ConsumePrefix(&body, "-"))) {
      if (!allow_positional) {
        return absl::InvalidArgumentError(
            absl::StrCat("unexpected argument '", arg, "': flags are written --name=value; --help lists them"));
      }
      out.positional.push_back(arg);
      continue;
    }
    const size_t eq = body.find('=');
    const std::string name(body.substr(0, eq));
    const bool has_value = eq != absl::string_view::npos;
    std::string value = has_value ? std::string(body.substr(eq + 1)) : "";
    if (name == "help" || name == "helpfull" || name == "h" || name == "helpshort") {
      out.help = true;
      continue;
    }
    auto it = flags.find(name);
    if (it == flags.end() && absl::StartsWith(name, "no") && !has_value) {
      // --noflag for a boolean.
      if (auto b = flags.find(name.substr(2)); b != flags.end() && b->second->IsOfType<bool>()) {
        std::string error;
        b->second->ParseFrom("false", &error);
        continue;
      }
    }
    if (it == flags.end()) return Unknown(name, flags);
    absl::CommandLineFlag& flag = *it->second;
    if (!has_value) {
      if (flag.IsOfType<bool>()) {
        value = "true";
      } else if (i + 1 < args.size() && !absl::StartsWith(args[i + 1], "--")) {
        value = args[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value: --", name, "=",
                                                       absl::AsciiStrToUpper(TypeName(flag))));
      }
    }
    std::string error;
    if (!flag.ParseFrom(value, &error)) {
      std::string expected = Expected(flag);
      return absl::InvalidArgumentError(
          expected.empty() ? absl::StrCat("--", name, ": ", error)
                           : absl::StrCat("--", name, ": '", value, "' is not ", expected));
    }
  }
  return out;
}

std::string HelpText(const std::string& usage) {
  std::string out = usage;
  if (!out.empty() && out.back() != '\n') out += "\n";
  absl::StrAppend(&out,
                  "\nFlags (--name=value or --name value; booleans --name or --noname; --flagfile=FILE reads more, "
                  "one a line):\n");
  for (const auto& [name, flag] : ProgramFlags()) {
    const std::string type = TypeName(*flag);
    std::string def = flag->DefaultValue();
    if (type == "string") def = absl::StrCat("\"", def, "\"");
    absl::StrAppend(&out, "  --", name, " (", type, ", default ", def, ")\n");
    // The meaning, wrapped at 100 columns.
    std::string line = "     ";
    for (absl::string_view word : absl::StrSplit(flag->Help(), ' ', absl::SkipEmpty())) {
      if (line.size() + 1 + word.size() > 100 && line.size() > 5) {
        absl::StrAppend(&out, line, "\n");
        line = "     ";
      }
      absl::StrAppend(&line, " ", word);
    }
    absl::StrAppend(&out, line, "\n");
  }
  absl::StrAppend(&out, "  --flagfile=FILE\n      Reads flags from FILE, one a line (# starts a comment line).\n",
                  "  --help\n      Prints this text and exits.\n");
  return out;
}

std::vector<std::string> ParseFlagsOrExit(int argc, char** argv, const CommandLineSpec& spec) {
  std::vector<std::string> args(argv + (argc > 0 ? 1 : 0), argv + argc);
  absl::StatusOr<ParsedCommandLine> parsed = ParseFlags(args, spec.positional);
  if (!parsed.ok()) {
    std::cerr << spec.program << ": " << parsed.status().message() << "\n";
    std::exit(2);
  }
  if (parsed->help) {
    std::cout << HelpText(spec.usage);
    std::cout.flush();
    std::exit(0);
  }
  return std::move(parsed->positional);
}

}  // namespace tokenbroker
