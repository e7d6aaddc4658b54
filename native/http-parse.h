// The pure half of the native token server (server.cc): framing request heads
// out of a connection's bytes, recognising the one hit case (a valid token
// request) and answering it from the route and token tables. No sockets, no
// Node, no clock: test/fuzz/parse_fuzzer.cc drives these directly.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace nmi {
namespace http {

constexpr const char* kTokenPath = "/metadata/identity/oauth2/token";
// Request bodies: proxied categories other than GETs only (scheduledevents' POST); as limits.ts's maxBodyBytes.
constexpr size_t kMaxBodyBytes = 16 * 1024;

struct RouteIdentity {
  std::string key;            // namespace/name
  std::string clientIdLower;  // lowercased in TS, as selectIdentity compares
  std::string resourceIdLower;
};
// One list per distinct set of identities, shared by every route that has it: on
// a node, pods of one deployment (or every pod, with one selector) are bound alike.
class IdentityList {
 public:
  IdentityList() : list_(std::make_shared<const std::vector<RouteIdentity>>()) {}
  IdentityList(std::initializer_list<RouteIdentity> ids) : list_(std::make_shared<const std::vector<RouteIdentity>>(ids)) {}
  explicit IdentityList(std::shared_ptr<const std::vector<RouteIdentity>> list) : list_(std::move(list)) {}
  size_t size() const { return list_->size(); }
  const RouteIdentity& operator[](size_t i) const { return (*list_)[i]; }
  std::vector<RouteIdentity>::const_iterator begin() const { return list_->begin(); }
  std::vector<RouteIdentity>::const_iterator end() const { return list_->end(); }

 private:
  std::shared_ptr<const std::vector<RouteIdentity>> list_;
};
struct Route {
  bool exception = false;
  IdentityList identities;
};
using RouteTable = std::unordered_map<std::string, Route>;  // caller address → route

struct TokenEntry {
  std::string prefix;  // body up to and including `"expires_in":"`
  std::string suffix;  // body from the `"` after expires_in
  int64_t expiresOn = 0;     // seconds since the epoch
  int64_t serveUntilMs = 0;  // wall clock; past it TS answers (and refreshes)
};
// key '\n' resource → entry; entries are shared, so a table updated by copy copies pointers, not tokens.
using TokenTable = std::unordered_map<std::string, std::shared_ptr<const TokenEntry>>;

std::string TokenKey(const std::string& identity, const std::string& resource);
// The same key into a reused string.
void TokenKey(const std::string& identity, const std::string& resource, std::string& key);

// Ends an answer's head as node:http ends it: Date (the RFC 7231 IMF-fixdate of nowMs, no locale
// involved, rendered once per second per thread), then Connection (and Keep-Alive), then the blank line.
void AppendDateAndConnection(int64_t nowMs, bool keepAlive, std::string& out);

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
  // kBody: a Transfer-Encoding body; kBodyNotAllowed: any body where Head::bodyless; kTooLarge: over kMaxBodyBytes.
  enum Kind { kIncomplete, kRequest, kMalformed, kOverflow, kBody, kBodyNotAllowed, kTooLarge };
  Kind kind = kIncomplete;
  size_t headBytes = 0;  // kRequest: the head, blank line included; contentLength body bytes follow
  Head head;             // kRequest
};

// llhttp skips empty lines before a request line: the caller drops this many bytes first.
size_t LeadingEmptyLines(std::string_view in);
// `in` starts at a request line (LeadingEmptyLines already dropped). Views, no copies: per request.
Framing FrameRequest(std::string_view in, size_t maxHeaderBytes);

// A token request the fast path may answer, as far as the head alone tells.
struct HitQuery {
  enum class By { kOnly, kClientId, kResourceId };  // kOnly: no id given, the caller's single (or first) identity
  std::string resource;
  By by = By::kOnly;
  std::string wanted;  // the requested id, lowercased
};

// false when TS must judge the request: anything but the exact, plain, valid case.
// A reused q keeps its strings' capacity.
bool ParseHitRequest(std::string_view head, bool metadataHeaderRequired, HitQuery& q);

// The complete 200 answer from the tables, appended to out (left as it was
// when false: TS must answer an unknown caller, an exception pod, no identity
// to serve, no fresh token). firstOfSeveral (--multiple-identities first): a
// request naming no id is served the route's first identity (TS ordered them)
// when it has several; else only a route with exactly one is.
bool AnswerFromTables(const HitQuery& q, const std::string& remote, bool keepAlive, bool firstOfSeveral,
                      const RouteTable& routes, const TokenTable& tokens, int64_t nowMs, std::string& out);

}  // namespace http
}  // namespace nmi
