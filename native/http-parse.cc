// Request framing and the hit case of the native token server. Validation
// lives in TS (src/server/request.ts): this file recognises the exact hit case
// and, when unsure, says no so the request is handed over.
#include "http-parse.h"

#include <string.h>
#include <time.h>

#include <charconv>
#include <climits>
#include <cstdio>
#include <unordered_set>

namespace nmi {
namespace http {
namespace {

using std::string_view;
constexpr size_t npos = string_view::npos;

const std::unordered_set<string_view> kApiVersions = {
    "2018-02-01", "2019-03-11", "2019-06-01", "2019-06-04", "2019-08-01", "2019-08-15", "2019-11-01",
    "2020-06-01", "2020-07-15", "2020-09-01", "2020-10-01", "2020-12-01", "2021-01-01", "2021-02-01",
    "2021-03-01", "2021-05-01", "2021-08-01", "2021-10-01", "2021-11-01", "2021-11-15", "2021-12-13",
    "2022-02-01", "2022-03-01", "2022-07-01", "2022-08-01", "2022-09-01", "2023-07-01", "2023-11-15",
    "2024-03-15", "2024-07-17", "2025-04-07",
};

// Byte classes as tables: isalnum and strchr per byte showed in the profile.
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
constexpr CharClasses kClasses = MakeCharClasses();

bool IsTchar(unsigned char c) { return kClasses.tchar[c]; }
bool IsTargetChar(unsigned char c) { return kClasses.target[c]; }
char LowerAscii(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; }
// `lower` is already lower case.
bool EqualsIgnoreCase(string_view s, string_view lower) {
  if (s.size() != lower.size()) return false;
  for (size_t i = 0; i < s.size(); i++)
    if (LowerAscii(s[i]) != lower[i]) return false;
  return true;
}
string_view TrimBlanks(string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}
int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
// decodeURIComponent of form data, limited to ASCII: false when TS must judge.
// A null out only checks.
bool DecodeAscii(string_view in, std::string* out) {
  if (in.find_first_of("%+") == npos) {  // the usual case: nothing to decode
    if (out) out->assign(in.data(), in.size());
    return true;
  }
  if (out) out->clear();
  for (size_t i = 0; i < in.size(); i++) {
    char c = in[i];
    if (c == '+') {
      c = ' ';
    } else if (c == '%') {
      if (i + 2 >= in.size()) return false;
      int hi = HexValue(in[i + 1]), lo = HexValue(in[i + 2]);
      if (hi < 0 || lo < 0 || hi >= 8) return false;
      c = static_cast<char>(hi * 16 + lo);
      i += 2;
    }
    if (out) *out += c;
  }
  return true;
}

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

// The token path, with one trailing slash or none, whatever query follows.
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

}  // namespace

void TokenKey(const std::string& identity, const std::string& resource, std::string& key) {
  key.assign(identity).append(1, '\n').append(resource);
}
std::string TokenKey(const std::string& identity, const std::string& resource) {
  std::string key;
  TokenKey(identity, resource, key);
  return key;
}

void AppendDateAndConnection(int64_t nowMs, bool keepAlive, std::string& out) {
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
  out += keepAlive ? "\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n" : "\r\nConnection: close\r\n\r\n";
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

Framing FrameRequest(string_view in, size_t maxHeaderBytes) {
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
  else if (h.contentLength > kMaxBodyBytes) f.kind = Framing::kTooLarge;
  else if (in.size() >= f.headBytes + h.contentLength) f.kind = Framing::kRequest;
  return f;
}

bool ParseHitRequest(string_view head, bool metadataHeaderRequired, HitQuery& q) {
  size_t lineEnd = head.find("\r\n");
  string_view line = head.substr(0, lineEnd);
  if (line.size() < 13 || line.substr(0, 4) != "GET " || line.substr(line.size() - 9) != " HTTP/1.1") return false;
  string_view target = line.substr(4, line.size() - 13);
  for (unsigned char ch : target)
    if (!IsTargetChar(ch)) return false;
  if (!IsTokenPath(target)) return false;
  size_t qm = target.find('?');
  string_view query = qm == npos ? string_view() : target.substr(qm + 1);

  // Headers: anything the js server treats specially goes to it.
  int metadataCount = 0, hostCount = 0;
  bool metadataTrue = false;
  size_t at = lineEnd + 2;
  while (at + 2 < head.size()) {
    size_t end = head.find("\r\n", at);
    if (end == npos) return false;  // not a head FrameRequest gave
    string_view field = head.substr(at, end - at);
    at = end + 2;
    size_t colon = field.find(':');
    if (colon == npos || colon == 0) return false;
    string_view name = field.substr(0, colon);
    for (unsigned char ch : name)
      if (!IsTchar(ch)) return false;
    string_view value = TrimBlanks(field.substr(colon + 1));
    for (unsigned char ch : value)
      if ((ch < 0x20 && ch != '\t') || ch >= 0x7f) return false;
    if (EqualsIgnoreCase(name, "metadata")) {
      metadataCount++;
      metadataTrue = EqualsIgnoreCase(value, "true");
    } else if (EqualsIgnoreCase(name, "host")) {
      hostCount++;
    } else if (EqualsIgnoreCase(name, "connection")) {
      if (!EqualsIgnoreCase(value, "close") && !EqualsIgnoreCase(value, "keep-alive")) return false;
    } else if (EqualsIgnoreCase(name, "x-forwarded-for") || EqualsIgnoreCase(name, "forwarded") ||
               EqualsIgnoreCase(name, "via") || EqualsIgnoreCase(name, "transfer-encoding") ||
               EqualsIgnoreCase(name, "content-length") || EqualsIgnoreCase(name, "upgrade") ||
               EqualsIgnoreCase(name, "expect")) {
      return false;
    }
  }
  if (hostCount == 0) return false;
  if (metadataHeaderRequired && (metadataCount != 1 || !metadataTrue)) return false;

  // Query: form-decoded; any parameter repeated, escaped beyond ASCII or malformed goes to TS,
  // and so does a query of more parameters than a token request has.
  struct Param {
    std::string name;  // decoded
    string_view value;  // raw, known to decode
  };
  constexpr size_t kMaxParams = 8;
  Param params[kMaxParams];
  size_t count = 0;
  size_t p = 0;
  while (p <= query.size()) {
    size_t amp = query.find('&', p);
    if (amp == npos) amp = query.size();
    string_view pair = query.substr(p, amp - p);
    p = amp + 1;
    if (pair.empty()) continue;
    if (count == kMaxParams) return false;
    size_t eq = pair.find('=');
    Param& param = params[count];
    param.value = eq == npos ? string_view() : pair.substr(eq + 1);
    if (!DecodeAscii(pair.substr(0, eq), &param.name) || !DecodeAscii(param.value, nullptr)) return false;
    for (size_t i = 0; i < count; i++)
      if (params[i].name == param.name) return false;
    count++;
  }
  auto find = [&](string_view name) -> const Param* {
    for (size_t i = 0; i < count; i++)
      if (params[i].name == name) return &params[i];
    return nullptr;
  };
  const Param* api = find("api-version");
  std::string apiVersion;
  if (!api || !DecodeAscii(api->value, &apiVersion) || !kApiVersions.count(apiVersion)) return false;
  const Param* res = find("resource");
  if (!res || !DecodeAscii(res->value, &q.resource) || q.resource.empty()) return false;
  int ids = 0;
  q.by = HitQuery::By::kOnly;
  q.wanted.clear();
  for (const char* name : {"client_id", "object_id", "msi_res_id", "mi_res_id"}) {
    const Param* id = find(name);
    if (!id) continue;
    ids++;
    if (strcmp(name, "object_id") == 0) return false;  // never matches: "Identity not found"
    q.by = strcmp(name, "client_id") == 0 ? HitQuery::By::kClientId : HitQuery::By::kResourceId;
    DecodeAscii(id->value, &q.wanted);
    for (auto& c : q.wanted) c = LowerAscii(c);
  }
  if (ids > 1 || (ids == 1 && q.wanted.empty())) return false;
  return true;
}

bool AnswerFromTables(const HitQuery& q, const std::string& remote, bool keepAlive, bool firstOfSeveral,
                      const RouteTable& routes, const TokenTable& tokens, int64_t nowMs, std::string& out) {
  auto route = routes.find(remote);
  if (route == routes.end() || route->second.exception) return false;
  const RouteIdentity* chosen = nullptr;
  if (q.by == HitQuery::By::kOnly) {
    size_t count = route->second.identities.size();
    if (count == 0 || (count > 1 && !firstOfSeveral)) return false;
    chosen = &route->second.identities[0];
  } else {
    for (const auto& id : route->second.identities) {
      const std::string& field = q.by == HitQuery::By::kClientId ? id.clientIdLower : id.resourceIdLower;
      if (!field.empty() && field == q.wanted) {
        chosen = &id;
        break;
      }
    }
    if (!chosen) return false;
  }
  thread_local std::string key;  // reused: no allocation per request
  TokenKey(chosen->key, q.resource, key);
  auto token = tokens.find(key);
  if (token == tokens.end() || nowMs >= token->second->serveUntilMs) return false;

  const TokenEntry& e = *token->second;
  int64_t expiresIn = e.expiresOn - nowMs / 1000;
  if (expiresIn < 0) expiresIn = 0;
  char digits[24];
  size_t digitCount = static_cast<size_t>(std::to_chars(digits, digits + sizeof digits, expiresIn).ptr - digits);
  size_t bodyBytes = e.prefix.size() + digitCount + e.suffix.size();
  // Appended in place, one growth at most: this is every hit's answer.
  size_t needed = out.size() + bodyBytes + 256;
  if (out.capacity() < needed) out.reserve(needed);
  out += "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ";
  AppendDecimal(static_cast<int64_t>(bodyBytes), out);
  out += "\r\nCache-Control: no-store\r\n";
  AppendDateAndConnection(nowMs, keepAlive, out);
  out += e.prefix;
  out.append(digits, digitCount);
  out += e.suffix;
  return true;
}

}  // namespace http
}  // namespace nmi
