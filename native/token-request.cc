// What a token request is on the native fast path, and the cache hit's answer.
// Validation lives in TS (src/server/request.ts): this file recognises the exact
// hit case and, when unsure, says no so the request is deferred to TS.
#include "token-request.h"

#include <string.h>

#include <charconv>

#include "http-parse.h"

namespace nmi {
namespace imds {
namespace {

using http::EqualsIgnoreCase;
using http::IsTargetChar;
using http::IsTchar;
using http::LowerAscii;
using http::TrimBlanks;
using std::string_view;
constexpr size_t npos = string_view::npos;

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

}  // namespace

void TokenKey(const std::string& identity, const std::string& resource, std::string& key) {
  key.assign(identity).append(1, '\n').append(resource);
}
std::string TokenKey(const std::string& identity, const std::string& resource) {
  std::string key;
  TokenKey(identity, resource, key);
  return key;
}

bool ParseHitRequest(string_view head, const TokenRules& rules, HitQuery& q) {
  size_t lineEnd = head.find("\r\n");
  string_view line = head.substr(0, lineEnd);
  if (line.size() < 13 || line.substr(0, 4) != "GET " || line.substr(line.size() - 9) != " HTTP/1.1") return false;
  string_view target = line.substr(4, line.size() - 13);
  for (unsigned char ch : target)
    if (!IsTargetChar(ch)) return false;
  if (!http::IsTokenPath(target)) return false;
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
  if (rules.metadataHeaderRequired && (metadataCount != 1 || !metadataTrue)) return false;

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
  if (!api || !DecodeAscii(api->value, &apiVersion) || !rules.apiVersions.count(apiVersion)) return false;
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

bool AnswerFromTables(const HitQuery& q, const std::string& remote, bool keepAlive, const TokenRules& rules,
                      const CallerTable& callers, const TokenTable& tokens, int64_t nowMs, std::string& out) {
  auto caller = callers.find(remote);
  if (caller == callers.end() || caller->second.exception) return false;
  const CallerIdentity* chosen = nullptr;
  if (q.by == HitQuery::By::kOnly) {
    size_t count = caller->second.identities.size();
    if (count == 0 || (count > 1 && rules.multipleIdentities != MultipleIdentities::kFirst)) return false;
    chosen = &caller->second.identities[0];
  } else {
    for (const auto& id : caller->second.identities) {
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
  const TokenBody& body = *e.body;
  size_t bodyBytes = body.prefix.size() + digitCount + body.suffix.size();
  // Appended in place, one growth at most: this is every hit's answer.
  size_t needed = out.size() + bodyBytes + 256;
  if (out.capacity() < needed) out.reserve(needed);
  out += "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ";
  http::AppendDecimal(static_cast<int64_t>(bodyBytes), out);
  out += "\r\nCache-Control: no-store\r\n";
  http::AppendDateAndConnection(nowMs, keepAlive, rules.keepAliveS, out);
  out += body.prefix;
  out.append(digits, digitCount);
  out += body.suffix;
  e.hits->fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace imds
}  // namespace nmi
