#pragma once

// The command line of tokenbroker, tokenbroker-monitor and tbctl: Abseil flags, parsed here rather
// than by absl::ParseCommandLine so that --help lists every flag of the program (Abseil's lists
// only flags of a file named after the binary) and a bad flag is one line and exit status 2
// (Abseil exits 1), with the closest flag named for a typo.

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tokenbroker {

struct CommandLineSpec {
  std::string program;  // "tokenbroker": the prefix of every error line
  std::string usage;    // printed first by --help: what the program does, and how to call it
  // Whether arguments that are not flags are allowed (tbctl's command); when not, one is an error.
  bool positional = false;
};

struct ParsedCommandLine {
  bool help = false;                    // --help, -h or --helpfull was given
  std::vector<std::string> positional;  // arguments that are not flags, in order (argv[0] excluded)
};

// Sets the program's flags from `args` (argv without argv[0]):
//  --name=value, --name value (not for booleans), --name / --noname for booleans, "-name" alike,
//  --flagfile=FILE (one argument a line; blank lines and lines starting with # are skipped),
//  and "--" ending the flags. INVALID_ARGUMENT with one line naming the flag at fault: unknown
//  (with "did you mean --x?" when a flag is close), a value missing, or a value that does not
//  parse (saying what was expected). Flags set before an error keep their new values.
absl::StatusOr<ParsedCommandLine> ParseFlags(const std::vector<std::string>& args, bool allow_positional);

// The text of --help: `usage`, then every flag of the program (not Abseil's own) by name with its
// type, default and meaning.
std::string HelpText(const std::string& usage);

// The closest of `candidates` to `word` when it is close enough to be a likely typo (dashes and
// underscores are the same; a few edits, or one contains the other); "" otherwise.
std::string ClosestMatch(absl::string_view word, const std::vector<std::string>& candidates);

// ParseFlags on argv; --help prints HelpText to stdout and exits 0; an error prints
// "<program>: <message>" to stderr and exits 2. Returns the positional arguments.
std::vector<std::string> ParseFlagsOrExit(int argc, char** argv, const CommandLineSpec& spec);

}  // namespace tokenbroker
