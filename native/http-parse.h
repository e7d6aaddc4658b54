// HTTP/1.1 framing for the native token server (server.cc): request heads and
// bodies cut out of a connection's bytes as llhttp would cut them, and the Date
// and Connection fields node ends an answer's head with. No sockets, no Node,
// no clock, and no bound of its own: the bounds come from TypeScript at start
// (src/config/limits.ts). What a framed head asks is token-request.cc's;
// test/fuzz/parse_fuzzer.cc drives both.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace nmi {
namespace http {

// The token endpoint: a body is refused there before it is read, whatever the method.
constexpr const char* kTokenPath = "/metadata/identity/oauth2/token";

// Byte classes as tables: isalnum and strchr per byte showed in the profile. Inline, with the helpers
// below, because token-request.cc runs them per byte of every head it reads.
struct CharClasses {
  bool tchar[256] = {};   // RFC 9110 tchar (a NUL byte is none: llhttp refuses it)
  bool target[256] = {};  // RFC 3986 pchar and query characters; anything else is left to TS
};
constexpr CharClasses MakeCharClasses() {
  CharClasses c;
  for (int i = 0; i < 256; i++) {
    bool alnum = (i >= '0' && i <= '9') || (i >= 'a' && i <= 'z') || (i >= 'A' && i <= 'Z');
    c.tchar[i] = c.target[i] = alnum;
  }
  for (const char* p = "!#$%&'*+-.^_`|~"; *p; p++) c.tchar[static_cast<unsigned char>(*p)] = true;
  for (const char* p = "-._~!$&'()*+,;=:@/?%"; *p; p++) c.target[static_cast<unsigned char>(*p)] = true;
  return c;
}
inline constexpr CharClasses kClasses = MakeCharClasses();

inline bool IsTchar(unsigned char c) { return kClasses.tchar[c]; }
inline bool IsTargetChar(unsigned char c) { return kClasses.target[c]; }
inline char LowerAscii(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; }
// `lower` is already lower case.
inline bool EqualsIgnoreCase(std::string_view s, std::string_view lower) {
  if (s.size() != lower.size()) return false;
  for (size_t i = 0; i < s.size(); i++)
    if (LowerAscii(s[i]) != lower[i]) return false;
  return true;
}
inline std::string_view TrimBlanks(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// The token path, with one trailing slash or none, whatever query follows.
bool IsTokenPath(std::string_view target);

void AppendDecimal(int64_t n, std::string& out);

// Ends an answer's head as node:http ends it: Date (the RFC 7231 IMF-fixdate of nowMs, no locale
// involved, rendered once per second per thread), then Connection (and Keep-Alive: timeout=keepAliveS,
// as node says its keepAliveTimeout), then the blank line.
void AppendDateAndConnection(int64_t nowMs, bool keepAlive, int64_t keepAliveS, std::string& out);

// What the head says about framing and connection reuse; filled for every request.
struct Head {
  bool valid = false;         // request line and headers parsed
  bool keepAlive = true;      // HTTP/1.1 without Connection: close
  bool bodyUnsupported = false;  // Transfer-Encoding: nmi does not take chunked bodies
  bool bodyless = false;         // GET, HEAD, or the token path: a body is refused before it is read
  size_t contentLength = 0;
  bool badLength = false;
};

// `head` is the request head, its blank line included.
Head ParseHead(std::string_view head);

// What the front of a connection's input holds.
struct Framing {
  // kBody: a Transfer-Encoding body; kBodyNotAllowed: any body where Head::bodyless; kTooLarge: over maxBodyBytes.
  enum Kind { kIncomplete, kRequest, kMalformed, kOverflow, kBody, kBodyNotAllowed, kTooLarge };
  Kind kind = kIncomplete;
  size_t headBytes = 0;  // kRequest: the head, blank line included; contentLength body bytes follow
  Head head;             // kRequest
};

// llhttp skips empty lines before a request line: the caller drops this many bytes first.
size_t LeadingEmptyLines(std::string_view in);
// `in` starts at a request line (LeadingEmptyLines already dropped). Views, no copies: per request.
Framing FrameRequest(std::string_view in, size_t maxHeaderBytes, size_t maxBodyBytes);

}  // namespace http
}  // namespace nmi
