#pragma once

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace tokenbroker {

// Makes text that came from outside (an upstream's error body, a caller's report) safe to log, to
// return to callers and to show operators (DESIGN §8):
//  - control characters (and DEL) are escaped as \n, \r, \t or \xNN, so the text cannot start a
//    forged log line or move a terminal's cursor; a backslash stays as it is;
//  - token-shaped strings are redacted: Google access tokens ("ya29." and what follows) become
//    "ya29.<redacted>", refresh tokens ("1//" and 10 or more token characters) "1//<redacted>";
//  - at most `max_bytes` bytes of the input are kept; a longer text ends with "...".
// Pure; the result contains no control character.
std::string SafeText(absl::string_view text, size_t max_bytes = 512);

// Only the redaction of SafeText (no escaping, no truncation): for text that is escaped later
// (e.g. by a JSON encoder).
std::string RedactTokens(absl::string_view text);

// Whether `text` holds a control character or a token-shaped string (what SafeText changes,
// truncation aside).
bool NeedsSafeText(absl::string_view text);

}  // namespace tokenbroker
