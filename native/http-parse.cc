// Request framing of the native token server, as llhttp frames: what it
// refuses is deferred to TypeScript with the reason, and TS answers as node would.
#include "http-parse.h"

#include <time.h>

#include <charconv>
#include <climits>
#include <cstdio>

namespace nmi {
namespace http {
namespace {

using std::string_view;
constexpr size_t npos = string_view::npos;

bool FirstLineLooksValid(string_view in) {
  size_t end = in.find('\n');
  if (end == npos) return true;  // not judged yet
  string_view line = in.substr(0, end);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  size_t sp1 = line.find(' ');
  size_t sp2 = line.rfind(' ');
  if (sp1 == npos || sp1 == 0 || sp1 == sp2) return false;
  for (size_t i = 0; i < sp1; i++)
    if (!IsTchar(line[i])) return false;
  string_view version = line.substr(sp2 + 1);
  return version == "HTTP/1.1" || version == "HTTP/1.0";
}

}  // namespace

bool IsTokenPath(string_view target) {
  string_view path = target.substr(0, target.find('?'));
  if (!path.empty() && path.back() == '/') path.remove_suffix(1);
  return path == kTokenPath;
}

void AppendDecimal(int64_t n, std::string& out) {
  char digits[24];
  auto end = std::to_chars(digits, digits + sizeof digits, n).ptr;
  out.append(digits, static_cast<size_t>(end - digits));
}

void AppendDateAndConnection(int64_t nowMs, bool keepAlive, int64_t keepAliveS, std::string& out) {
  static const char* days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
  static const char* months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  thread_local int64_t renderedSecond = INT64_MIN;
  thread_local char text[40];
  thread_local size_t length = 0;
  int64_t second = nowMs / 1000;
  if (second != renderedSecond) {
    time_t secs = static_cast<time_t>(second);
    tm t{};
    gmtime_r(&secs, &t);
    int n = snprintf(text, sizeof text, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[t.tm_wday], t.tm_mday,
                     months[t.tm_mon], t.tm_year + 1900, t.tm_hour, t.tm_min, t.tm_sec);
    length = n > 0 ? static_cast<size_t>(n) : 0;
    renderedSecond = second;
  }
  out += "Date: ";
  out.append(text, length);
  if (!keepAlive) {
    out += "\r\nConnection: close\r\n\r\n";
    return;
  }
  out += "\r\nConnection: keep-alive\r\nKeep-Alive: timeout=";
  AppendDecimal(keepAliveS, out);
  out += "\r\n\r\n";
}

Head ParseHead(string_view head) {
  Head h;
  size_t lineEnd = head.find("\r\n");
  string_view line = head.substr(0, lineEnd);
  size_t sp1 = line.find(' ');
  size_t sp2 = line.rfind(' ');
  if (sp1 == npos || sp1 == sp2 || sp1 == 0) return h;
  for (size_t i = 0; i < sp1; i++)
    if (!IsTchar(line[i])) return h;
  string_view version = line.substr(sp2 + 1);
  bool http10 = version == "HTTP/1.0";
  if (http10) h.keepAlive = false;
  else if (version != "HTTP/1.1") return h;
  string_view method = line.substr(0, sp1);
  h.bodyless = method == "GET" || method == "HEAD" || IsTokenPath(line.substr(sp1 + 1, sp2 - sp1 - 1));
  bool sawLength = false;
  size_t at = lineEnd + 2;
  while (at < head.size()) {
    size_t end = head.find("\r\n", at);
    if (end == npos) end = head.size();
    string_view field = head.substr(at, end - at);
    at = end + 2;
    if (field.empty()) break;  // the blank line ending the head
    size_t colon = field.find(':');
    if (colon == npos || colon == 0) return h;
    string_view name = field.substr(0, colon);
    string_view value = TrimBlanks(field.substr(colon + 1));
    if (EqualsIgnoreCase(name, "connection")) {
      // Token list; close wins, keep-alive revives an HTTP/1.0 connection.
      size_t p = 0;
      while (p <= value.size()) {
        size_t q = value.find(',', p);
        if (q == npos) q = value.size();
        string_view tok = TrimBlanks(value.substr(p, q - p));
        if (EqualsIgnoreCase(tok, "close")) h.keepAlive = false;
        else if (EqualsIgnoreCase(tok, "keep-alive") && http10) h.keepAlive = true;
        p = q + 1;
      }
    } else if (EqualsIgnoreCase(name, "transfer-encoding")) {
      h.bodyUnsupported = true;
    } else if (EqualsIgnoreCase(name, "content-length")) {
      if (value.empty() || value.size() > 12 || value.find_first_not_of("0123456789") != npos) {
        h.badLength = true;
      } else {
        size_t n = 0;
        for (char c : value) n = n * 10 + static_cast<size_t>(c - '0');
        if (sawLength && n != h.contentLength) h.badLength = true;
        h.contentLength = n;
        sawLength = true;
      }
    }
  }
  // A kept-alive HTTP/1.0 connection has a Connection header that said so; a close later wins.
  h.valid = true;
  return h;
}

size_t LeadingEmptyLines(string_view in) {
  size_t skip = 0;
  while (skip + 1 < in.size() && in[skip] == '\r' && in[skip + 1] == '\n') skip += 2;
  return skip;
}

Framing FrameRequest(string_view in, size_t maxHeaderBytes, size_t maxBodyBytes) {
  Framing f;
  if (!FirstLineLooksValid(in)) {
    f.kind = Framing::kMalformed;
    return f;
  }
  size_t end = in.find("\r\n\r\n");
  if (end == npos || end + 4 > maxHeaderBytes) {
    if (in.size() > maxHeaderBytes || end != npos) f.kind = Framing::kOverflow;
    return f;
  }
  f.headBytes = end + 4;
  f.head = ParseHead(in.substr(0, f.headBytes));
  const Head& h = f.head;
  if (!h.valid || h.badLength) f.kind = Framing::kMalformed;
  else if (h.bodyless && (h.bodyUnsupported || h.contentLength > 0)) f.kind = Framing::kBodyNotAllowed;
  else if (h.bodyUnsupported) f.kind = Framing::kBody;
  else if (h.contentLength > maxBodyBytes) f.kind = Framing::kTooLarge;
  else if (in.size() >= f.headBytes + h.contentLength) f.kind = Framing::kRequest;
  return f;
}

}  // namespace http
}  // namespace nmi
