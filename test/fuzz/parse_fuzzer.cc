// libFuzzer target for the native server's pure half (native/http-parse.cc's
// framing, native/token-request.cc's token rules): the input is what one
// connection sent. It is framed as connection.cc's ProcessOne frames it, and
// every complete bodiless request goes through the hit check and the table
// lookup, against a small fixed table so hits are reachable. The bounds and
// the api-version list, which the daemon gives from TypeScript, are given here. Beyond the sanitizers, the invariants below are restated here
// independently of the parser: a hit must be a request node's parser would
// also take, for the token path, by GET, answered with a well-formed 200.
// Built and run by scripts/fuzz.sh.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "../../native/http-parse.h"
#include "../../native/token-request.h"
#include "check.h"

using namespace nmi::http;
using namespace nmi::imds;

namespace {

constexpr int64_t kNowMs = 1750000000000;  // fixed: runs must be reproducible
const char* const kRemotes[] = {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.9"};
constexpr size_t kMaxBodyBytes = 16 * 1024;  // as src/config/limits.ts's maxBodyBytes

// The rules the daemon gives from TypeScript, in each combination the fuzzer compares.
TokenRules Rules(bool metadataHeaderRequired, MultipleIdentities multiple) {
  TokenRules r;
  r.metadataHeaderRequired = metadataHeaderRequired;
  r.multipleIdentities = multiple;
  // A few of request.ts's IDENTITY_API_VERSIONS: any other version is deferred, as an unknown one would be.
  r.apiVersions = {"2018-02-01", "2019-08-01", "2021-02-01", "2025-04-07"};
  r.keepAliveS = 5;
  return r;
}
const TokenRules kStrict = Rules(true, MultipleIdentities::kRefuse);
const TokenRules kLax = Rules(false, MultipleIdentities::kRefuse);
const TokenRules kLaxFirst = Rules(false, MultipleIdentities::kFirst);

const CallerTable& Callers() {
  static const CallerTable table = [] {
    CallerIdentity a{"default/a", "aaaa-1111", "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/a"};
    CallerIdentity b{"default/b", "bbbb-2222", "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/b"};
    CallerIdentity noIds{"default/c", "", ""};
    CallerTable t;
    t["10.0.0.1"] = CallerEntry{false, {a}};         // the single identity: no id needed
    t["10.0.0.2"] = CallerEntry{false, {a, b}};      // two: an id must choose
    t["10.0.0.3"] = CallerEntry{true, {a}};          // exception pod: never a hit
    t["10.0.0.4"] = CallerEntry{false, {noIds, b}};  // empty ids never match an id
    return t;
  }();
  return table;
}

std::shared_ptr<const TokenEntry> Entry(const std::string& name, const std::string& resource, int64_t expiresOn, int64_t serveUntilMs) {
  auto body = std::make_shared<const TokenBody>(TokenBody{"{\"access_token\":\"token-for-" + name + "\",\"expires_in\":\"",
                                                          "\",\"resource\":\"" + resource + "\",\"token_type\":\"Bearer\"}"});
  return std::make_shared<const TokenEntry>(TokenEntry{body, expiresOn, serveUntilMs});
}

const TokenTable& Tokens() {
  static const TokenTable table = [] {
    TokenTable t;
    t[TokenKey("default/a", "https://vault.azure.net")] = Entry("a", "https://vault.azure.net", kNowMs / 1000 + 3600, kNowMs + 60000);
    t[TokenKey("default/b", "https://vault.azure.net")] = Entry("b", "https://vault.azure.net", kNowMs / 1000 + 3600, kNowMs + 60000);
    // Past expiry but still servable: expires_in is clamped to 0.
    t[TokenKey("default/a", "https://management.azure.com/")] = Entry("a", "https://management.azure.com/", kNowMs / 1000 - 10, kNowMs + 1);
    // Past serveUntil: TS answers.
    t[TokenKey("default/b", "https://storage.azure.com/")] = Entry("b", "https://storage.azure.com/", kNowMs / 1000 + 3600, kNowMs);
    t[TokenKey("default/c", "https://vault.azure.net")] = Entry("c", "https://vault.azure.net", kNowMs / 1000 + 3600, kNowMs + 60000);
    return t;
  }();
  return table;
}

// RFC 9110 tchar, spelled out rather than shared with the parser.
bool Tchar(unsigned char c) {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
  for (const char* p = "!#$%&'*+-.^_`|~"; *p; p++)
    if (c == static_cast<unsigned char>(*p)) return true;
  return false;
}

bool EqualsIgnoreCase(const std::string& a, const char* b) {
  size_t i = 0;
  for (; i < a.size() && b[i]; i++) {
    unsigned char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x += 32;
    if (y >= 'A' && y <= 'Z') y += 32;
    if (x != y) return false;
  }
  return i == a.size() && b[i] == 0;
}

std::string Trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t')) b++;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t')) e--;
  return s.substr(b, e - b);
}

// What a head the fast path calls a hit must look like.
void CheckHitHead(const std::string& head, const HitQuery& q, bool metadataRequired) {
  size_t lineEnd = head.find("\r\n");
  CHECK(lineEnd != std::string::npos);
  std::string line = head.substr(0, lineEnd);
  const std::string token = kTokenPath;
  CHECK(line.size() >= 4 + token.size() + 9 && line.compare(line.size() - 9, 9, " HTTP/1.1") == 0);
  CHECK(line.rfind("GET " + token, 0) == 0);
  char after = line[4 + token.size()];
  CHECK(after == ' ' || after == '?' || after == '/');
  if (after == '/') CHECK(line[5 + token.size()] == ' ' || line[5 + token.size()] == '?');
  int spaces = 0;
  for (unsigned char c : line) {
    if (c == ' ') spaces++;
    else CHECK(c > 0x20 && c < 0x7f);  // no control, NUL or non-ASCII byte in the request line
  }
  CHECK(spaces == 2);

  int hosts = 0, metadata = 0;
  bool metadataTrue = false;
  size_t at = lineEnd + 2;
  while (true) {
    size_t end = head.find("\r\n", at);
    CHECK(end != std::string::npos);
    if (end == at) break;
    std::string field = head.substr(at, end - at);
    at = end + 2;
    size_t colon = field.find(':');
    CHECK(colon != std::string::npos && colon > 0);
    std::string name = field.substr(0, colon);
    for (unsigned char c : name) CHECK(Tchar(c));
    std::string value = Trim(field.substr(colon + 1));
    for (unsigned char c : value) CHECK(c == '\t' || (c >= 0x20 && c < 0x7f));
    CHECK(!EqualsIgnoreCase(name, "content-length") && !EqualsIgnoreCase(name, "transfer-encoding"));
    CHECK(!EqualsIgnoreCase(name, "x-forwarded-for") && !EqualsIgnoreCase(name, "forwarded") && !EqualsIgnoreCase(name, "via"));
    if (EqualsIgnoreCase(name, "host")) hosts++;
    if (EqualsIgnoreCase(name, "metadata")) {
      metadata++;
      metadataTrue = EqualsIgnoreCase(value, "true");
    }
  }
  CHECK(at + 2 == head.size());  // the first blank line ends the head
  CHECK(hosts >= 1);
  if (metadataRequired) CHECK(metadata == 1 && metadataTrue);
  CHECK(!q.resource.empty());
  CHECK((q.by == HitQuery::By::kOnly) == q.wanted.empty());
  for (unsigned char c : q.wanted) CHECK(!(c >= 'A' && c <= 'Z'));
}

void CheckAnswer(const std::string& out, const HitQuery& q, const std::string& remote, bool keepAlive, bool first) {
  auto caller = Callers().find(remote);
  CHECK(caller != Callers().end() && !caller->second.exception);
  CHECK(out.rfind("HTTP/1.1 200 OK\r\n", 0) == 0);
  size_t headEnd = out.find("\r\n\r\n");
  CHECK(headEnd != std::string::npos);
  std::string head = out.substr(0, headEnd + 2), body = out.substr(headEnd + 4);
  CHECK(head.find("\r\nContent-Length: " + std::to_string(body.size()) + "\r\n") != std::string::npos);
  CHECK((head.find("\r\nConnection: close\r\n") != std::string::npos) == !keepAlive);
  const auto& identities = caller->second.identities;
  // No id asked: the only identity, or with --multiple-identities first the first; never another.
  if (q.by == HitQuery::By::kOnly) CHECK(first ? identities.size() >= 1 : identities.size() == 1);
  bool matched = false;
  for (const auto& identity : identities) {
    if (q.by == HitQuery::By::kOnly && &identity != &identities[0]) break;
    auto entry = Tokens().find(TokenKey(identity.key, q.resource));
    if (entry == Tokens().end()) continue;
    const TokenEntry& e = *entry->second;
    const TokenBody& b = *e.body;
    if (body.size() < b.prefix.size() + b.suffix.size() + 1) continue;
    if (body.compare(0, b.prefix.size(), b.prefix) != 0) continue;
    if (body.compare(body.size() - b.suffix.size(), b.suffix.size(), b.suffix) != 0) continue;
    std::string digits = body.substr(b.prefix.size(), body.size() - b.prefix.size() - b.suffix.size());
    CHECK(digits.find_first_not_of("0123456789") == std::string::npos);
    CHECK(kNowMs < e.serveUntilMs);
    matched = true;
  }
  CHECK(matched);
}

void CheckHit(const std::string& head, bool keepAlive) {
  HitQuery strict, lax;
  bool strictHit = ParseHitRequest(head, kStrict, strict);
  bool laxHit = ParseHitRequest(head, kLax, lax);
  if (strictHit) {
    // Requiring the Metadata header can only turn hits away, never change what is asked.
    CHECK(laxHit && strict.resource == lax.resource && strict.by == lax.by && strict.wanted == lax.wanted);
    CheckHitHead(head, strict, true);
  }
  if (!laxHit) return;
  CheckHitHead(head, lax, false);
  for (const char* remote : kRemotes) {
    for (bool first : {false, true}) {
      std::string out;
      if (AnswerFromTables(lax, remote, keepAlive, first ? kLaxFirst : kLax, Callers(), Tokens(), kNowMs, out))
        CheckAnswer(out, lax, remote, keepAlive, first);
      else CHECK(out.empty());
    }
  }
}

// A body is taken only off the token path and not by GET or HEAD: the request line, read again here.
void CheckBodyAllowed(const std::string& line) {
  size_t first = line.find(' '), last = line.rfind(' ');
  CHECK(first != std::string::npos && last > first);
  std::string method = line.substr(0, first);
  std::string path = line.substr(first + 1, last - first - 1);
  path = path.substr(0, path.find('?'));
  if (!path.empty() && path.back() == '/') path.pop_back();
  CHECK(method != "GET" && method != "HEAD" && path != kTokenPath);
}

// One connection's bytes, framed as ProcessOne does.
void Connection(std::string in, size_t maxHeaderBytes) {
  for (int requests = 0; requests < 64; requests++) {
    in.erase(0, LeadingEmptyLines(in));
    if (in.empty()) return;
    Framing f = FrameRequest(in, maxHeaderBytes, kMaxBodyBytes);
    if (f.kind != Framing::kRequest) {
      if (f.kind == Framing::kOverflow) CHECK(in.size() > maxHeaderBytes || in.find("\r\n\r\n") + 4 > maxHeaderBytes);
      return;  // deferred to TS, or more bytes awaited
    }
    const Head& h = f.head;
    CHECK(h.valid && !h.badLength && !h.bodyUnsupported);
    CHECK(f.headBytes >= 4 && f.headBytes <= maxHeaderBytes && f.headBytes <= in.size());
    CHECK(in.find("\r\n\r\n") == f.headBytes - 4);
    CHECK(h.contentLength <= kMaxBodyBytes && f.headBytes + h.contentLength <= in.size());
    if (h.contentLength > 0) CheckBodyAllowed(in.substr(0, in.find("\r\n")));
    std::string head = in.substr(0, f.headBytes);
    in.erase(0, f.headBytes + h.contentLength);
    if (h.contentLength == 0) CheckHit(head, h.keepAlive);
    if (!h.keepAlive) return;  // nothing after a closing request is read
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string in(reinterpret_cast<const char*>(data), size);
  Connection(in, 16 * 1024);  // the daemon's default
  Connection(in, 96);         // small enough that the overflow path is reached often
  return 0;
}
