#include "lib/common/safe_text.h"

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"

namespace tokenbroker {
namespace {

// Characters of OAuth tokens (RFC 6750 b64token, plus '.', which access tokens contain).
bool TokenChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
         c == '.' || c == '~' || c == '+' || c == '/' || c == '=';
}

size_t TokenRunAt(absl::string_view text, size_t i) {
  size_t j = i;
  while (j < text.size() && TokenChar(text[j])) ++j;
  return j - i;
}

// The length of the token-shaped string starting at `i` (its redacted prefix included), or 0.
// Sets *keep to how much of it stays visible ("ya29." / "1//").
size_t TokenAt(absl::string_view text, size_t i, size_t* keep) {
  absl::string_view rest = text.substr(i);
  if (rest.size() > 5 && (rest[0] == 'y' || rest[0] == 'Y') && absl::StartsWithIgnoreCase(rest, "ya29.")) {
    *keep = 5;
    size_t n = TokenRunAt(text, i + 5);
    return n > 0 ? 5 + n : 0;
  }
  if (rest.size() > 3 && rest[0] == '1' && rest[1] == '/' && rest[2] == '/') {
    *keep = 3;
    size_t n = TokenRunAt(text, i + 3);
    return n >= 10 ? 3 + n : 0;
  }
  return 0;
}

template <typename Emit>
void Walk(absl::string_view text, bool escape, Emit&& emit) {
  for (size_t i = 0; i < text.size();) {
    size_t keep = 0;
    if (size_t n = TokenAt(text, i, &keep); n > 0) {
      emit(text.substr(i, keep));
      emit("<redacted>");
      i += n;
      continue;
    }
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (escape && (c < 0x20 || c == 0x7f)) {
      switch (c) {
        case '\n': emit("\\n"); break;
        case '\r': emit("\\r"); break;
        case '\t': emit("\\t"); break;
        default: emit(absl::StrFormat("\\x%02x", c)); break;
      }
    } else {
      emit(text.substr(i, 1));
    }
    ++i;
  }
}

}  // namespace

std::string SafeText(absl::string_view text, size_t max_bytes) {
  const bool cut = text.size() > max_bytes;
  if (cut) text = text.substr(0, max_bytes);
  std::string out;
  out.reserve(text.size() + 8);
  Walk(text, /*escape=*/true, [&](absl::string_view s) { out.append(s.data(), s.size()); });
  if (cut) out.append("...");
  return out;
}

std::string RedactTokens(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  Walk(text, /*escape=*/false, [&](absl::string_view s) { out.append(s.data(), s.size()); });
  return out;
}

bool NeedsSafeText(absl::string_view text) {
  for (size_t i = 0; i < text.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) return true;
    size_t keep = 0;
    if ((c == 'y' || c == 'Y' || c == '1') && TokenAt(text, i, &keep) > 0) return true;
  }
  return false;
}

}  // namespace tokenbroker
