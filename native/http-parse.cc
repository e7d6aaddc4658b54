// Request framing and the hit case of the native token server. Validation
// lives in TS (src/server/request.ts): this file recognises the exact hit case
// and, when unsure, says no so the request is handed over.
#include "http-parse.h"

#include <string.h>
#include <time.h>

#include <cctype>
#include <cstdio>
#include <map>
#include <unordered_set>

namespace nmi {
namespace http {
namespace {

const std::unordered_set<std::string> kApiVersions = {
    "2018-02-01", "2019-03-11", "2019-06-01", "2019-06-04", "2019-08-01", "2019-08-15", "2019-11-01",
    "2020-06-01", "2020-07-15", "2020-09-01", "2020-10-01", "2020-12-01", "2021-01-01", "2021-02-01",
    "2021-03-01", "2021-05-01", "2021-08-01", "2021-10-01", "2021-11-01", "2021-11-15", "2021-12-13",
    "2022-02-01", "2022-03-01", "2022-07-01", "2022-08-01", "2022-09-01", "2023-07-01", "2023-11-15",
    "2024-03-15", "2024-07-17", "2025-04-07",
};

// c != 0 because strchr finds the terminator: a NUL byte is no tchar (llhttp refuses it).
bool IsTchar(unsigned char c) {
  return isalnum(c) || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != nullptr);
}
// RFC 3986 pchar and query characters; anything else is left to TS.
bool IsTargetChar(unsigned char c) {
  return isalnum(c) || (c != 0 && strchr("-._~!$&'()*+,;=:@/?%", c) != nullptr);
}
std::string Lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
  return s;
}
int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
// decodeURIComponent of form data, limited to ASCII: false when TS must judge.
bool DecodeAscii(const std::string& in, std::string& out) {
  out.clear();
  for (size_t i = 0; i < in.size(); i++) {
    char c = in[i];
    if (c == '+') {
      out += ' ';
    } else if (c == '%') {
      if (i + 2 >= in.size()) return false;
      int hi = HexValue(in[i + 1]), lo = HexValue(in[i + 2]);
      if (hi < 0 || lo < 0 || hi >= 8) return false;
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += c;
    }
  }
  return true;
}

bool FirstLineLooksValid(const std::string& in) {
  size_t end = in.find('\n');
  if (end == std::string::npos) return true;  // not judged yet
  std::string line = in.substr(0, end);
  if (!line.empty() && line.back() == '\r') line.pop_back();
  size_t sp1 = line.find(' ');
  size_t sp2 = line.rfind(' ');
  if (sp1 == std::string::npos || sp1 == 0 || sp1 == sp2) return false;
  for (size_t i = 0; i < sp1; i++)
    if (!IsTchar(line[i])) return false;
  std::string version = line.substr(sp2 + 1);
  return version == "HTTP/1.1" || version == "HTTP/1.0";
}

}  // namespace

std::string TokenKey(const std::string& identity, const std::string& resource) { return identity + '\n' + resource; }

std::string HttpDate(int64_t nowMs) {
  static const char* days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
  static const char* months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  time_t secs = static_cast<time_t>(nowMs / 1000);
  tm t{};
  gmtime_r(&secs, &t);
  char buf[40];
  snprintf(buf, sizeof buf, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[t.tm_wday], t.tm_mday, months[t.tm_mon],
           t.tm_year + 1900, t.tm_hour, t.tm_min, t.tm_sec);
  return buf;
}

Head ParseHead(const std::string& head) {
  Head h;
  size_t lineEnd = head.find("\r\n");
  std::string line = head.substr(0, lineEnd);
  size_t sp1 = line.find(' ');
  size_t sp2 = line.rfind(' ');
  if (sp1 == std::string::npos || sp1 == sp2 || sp1 == 0) return h;
  for (size_t i = 0; i < sp1; i++)
    if (!IsTchar(line[i])) return h;
  std::string version = line.substr(sp2 + 1);
  if (version == "HTTP/1.0") h.keepAlive = false;
  else if (version != "HTTP/1.1") return h;
  bool sawLength = false;
  size_t at = lineEnd + 2;
  while (at < head.size()) {
    size_t end = head.find("\r\n", at);
    if (end == std::string::npos) end = head.size();
    std::string field = head.substr(at, end - at);
    at = end + 2;
    if (field.empty()) break;  // the blank line ending the head
    size_t colon = field.find(':');
    if (colon == std::string::npos || colon == 0) return h;
    std::string name = Lower(field.substr(0, colon));
    size_t v = colon + 1;
    while (v < field.size() && (field[v] == ' ' || field[v] == '\t')) v++;
    size_t ve = field.size();
    while (ve > v && (field[ve - 1] == ' ' || field[ve - 1] == '\t')) ve--;
    std::string value = Lower(field.substr(v, ve - v));
    if (name == "connection") {
      // Token list; close wins, keep-alive revives an HTTP/1.0 connection.
      size_t p = 0;
      while (p <= value.size()) {
        size_t q = value.find(',', p);
        if (q == std::string::npos) q = value.size();
        std::string tok = value.substr(p, q - p);
        while (!tok.empty() && (tok.front() == ' ' || tok.front() == '\t')) tok.erase(0, 1);
        while (!tok.empty() && (tok.back() == ' ' || tok.back() == '\t')) tok.pop_back();
        if (tok == "close") h.keepAlive = false;
        else if (tok == "keep-alive" && version == "HTTP/1.0") h.keepAlive = true;
        p = q + 1;
      }
    } else if (name == "transfer-encoding") {
      h.bodyUnsupported = true;
    } else if (name == "content-length") {
      if (value.empty() || value.size() > 12 || value.find_first_not_of("0123456789") != std::string::npos) {
        h.badLength = true;
      } else {
        size_t n = std::stoull(value);
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

size_t LeadingEmptyLines(const std::string& in) {
  size_t skip = 0;
  while (skip + 1 < in.size() && in[skip] == '\r' && in[skip + 1] == '\n') skip += 2;
  return skip;
}

Framing FrameRequest(const std::string& in, size_t maxHeaderBytes) {
  Framing f;
  if (!FirstLineLooksValid(in)) {
    f.kind = Framing::kMalformed;
    return f;
  }
  size_t end = in.find("\r\n\r\n");
  if (end == std::string::npos || end + 4 > maxHeaderBytes) {
    if (in.size() > maxHeaderBytes || end != std::string::npos) f.kind = Framing::kOverflow;
    return f;
  }
  f.headBytes = end + 4;
  f.head = ParseHead(in.substr(0, f.headBytes));
  const Head& h = f.head;
  if (!h.valid || h.badLength) f.kind = Framing::kMalformed;
  else if (h.bodyUnsupported || h.contentLength > kMaxBodyBytes) f.kind = Framing::kBody;
  else if (in.size() >= f.headBytes + h.contentLength) f.kind = Framing::kRequest;
  return f;
}

bool ParseHitRequest(const std::string& head, bool metadataHeaderRequired, HitQuery& q) {
  size_t lineEnd = head.find("\r\n");
  std::string line = head.substr(0, lineEnd);
  if (line.compare(0, 4, "GET ") != 0 || line.size() < 13 || line.compare(line.size() - 9, 9, " HTTP/1.1") != 0) return false;
  std::string target = line.substr(4, line.size() - 13);
  for (unsigned char ch : target)
    if (!IsTargetChar(ch)) return false;
  size_t qm = target.find('?');
  std::string path = target.substr(0, qm);
  if (path != kTokenPath && path != std::string(kTokenPath) + "/") return false;
  std::string query = qm == std::string::npos ? "" : target.substr(qm + 1);

  // Headers: anything the js server treats specially goes to it.
  int metadataCount = 0, hostCount = 0;
  std::string metadata;
  size_t at = lineEnd + 2;
  while (at + 2 < head.size()) {
    size_t end = head.find("\r\n", at);
    std::string field = head.substr(at, end - at);
    at = end + 2;
    size_t colon = field.find(':');
    if (colon == std::string::npos || colon == 0) return false;
    for (size_t i = 0; i < colon; i++)
      if (!IsTchar(field[i])) return false;
    std::string name = Lower(field.substr(0, colon));
    size_t v = colon + 1;
    while (v < field.size() && (field[v] == ' ' || field[v] == '\t')) v++;
    size_t ve = field.size();
    while (ve > v && (field[ve - 1] == ' ' || field[ve - 1] == '\t')) ve--;
    for (size_t i = v; i < ve; i++) {
      unsigned char ch = field[i];
      if ((ch < 0x20 && ch != '\t') || ch >= 0x7f) return false;
    }
    std::string value = field.substr(v, ve - v);
    if (name == "metadata") {
      metadataCount++;
      metadata = Lower(value);
    } else if (name == "host") {
      hostCount++;
    } else if (name == "connection") {
      std::string lv = Lower(value);
      if (lv != "close" && lv != "keep-alive") return false;
    } else if (name == "x-forwarded-for" || name == "forwarded" || name == "via" || name == "transfer-encoding" ||
               name == "content-length" || name == "upgrade" || name == "expect") {
      return false;
    }
  }
  if (hostCount == 0) return false;
  if (metadataHeaderRequired && (metadataCount != 1 || metadata != "true")) return false;

  // Query: form-decoded; any parameter repeated, escaped beyond ASCII or malformed goes to TS.
  std::map<std::string, std::string> params;
  size_t p = 0;
  while (p <= query.size()) {
    size_t amp = query.find('&', p);
    if (amp == std::string::npos) amp = query.size();
    std::string pair = query.substr(p, amp - p);
    p = amp + 1;
    if (pair.empty()) continue;
    size_t eq = pair.find('=');
    std::string name, value;
    if (!DecodeAscii(pair.substr(0, eq), name)) return false;
    if (!DecodeAscii(eq == std::string::npos ? "" : pair.substr(eq + 1), value)) return false;
    if (!params.emplace(name, value).second) return false;
  }
  auto api = params.find("api-version");
  if (api == params.end() || !kApiVersions.count(api->second)) return false;
  auto res = params.find("resource");
  if (res == params.end() || res->second.empty()) return false;
  int ids = 0;
  q = HitQuery{};
  for (const char* name : {"client_id", "object_id", "msi_res_id", "mi_res_id"}) {
    auto it = params.find(name);
    if (it == params.end()) continue;
    ids++;
    if (strcmp(name, "object_id") == 0) return false;  // never matches: "Identity not found"
    q.by = strcmp(name, "client_id") == 0 ? HitQuery::By::kClientId : HitQuery::By::kResourceId;
    q.wanted = Lower(it->second);
  }
  if (ids > 1 || (ids == 1 && q.wanted.empty())) return false;
  q.resource = res->second;
  return true;
}

bool AnswerFromTables(const HitQuery& q, const std::string& remote, bool keepAlive, const RouteTable& routes,
                      const TokenTable& tokens, int64_t nowMs, std::string& out) {
  auto route = routes.find(remote);
  if (route == routes.end() || route->second.exception) return false;
  const RouteIdentity* chosen = nullptr;
  if (q.by == HitQuery::By::kOnly) {
    if (route->second.identities.size() != 1) return false;
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
  auto token = tokens.find(TokenKey(chosen->key, q.resource));
  if (token == tokens.end() || nowMs >= token->second->serveUntilMs) return false;

  int64_t expiresIn = token->second->expiresOn - nowMs / 1000;
  if (expiresIn < 0) expiresIn = 0;
  std::string body = token->second->prefix + std::to_string(expiresIn) + token->second->suffix;
  out.reserve(body.size() + 256);
  out += "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ";
  out += std::to_string(body.size());
  out += "\r\nCache-Control: no-store\r\nDate: ";
  out += HttpDate(nowMs);
  out += keepAlive ? "\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n" : "\r\nConnection: close\r\n\r\n";
  out += body;
  return true;
}

}  // namespace http
}  // namespace nmi
