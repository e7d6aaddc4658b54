// IMDS's token rules on the native fast path: whether a framed head is a token
// request the fast path may answer (one src/server/request.ts's checks 1-5 pass,
// and nothing else: when unsure, no, and TypeScript judges it), and the cache
// hit's answer from the caller and token tables. The rules' values (the
// api-version list, the policies) come from TypeScript at start, as the tables do.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <unordered_map>
#include <vector>

namespace nmi {
namespace imds {

struct CallerIdentity {
  std::string key;            // namespace/name
  std::string clientIdLower;  // lowercased in TS, as selectIdentity compares
  std::string resourceIdLower;
};
// One list per distinct set of identities, shared by every caller entry that has it: on
// a node, pods of one deployment (or every pod, with one selector) are bound alike.
class IdentityList {
 public:
  IdentityList() : list_(std::make_shared<const std::vector<CallerIdentity>>()) {}
  IdentityList(std::initializer_list<CallerIdentity> ids) : list_(std::make_shared<const std::vector<CallerIdentity>>(ids)) {}
  explicit IdentityList(std::shared_ptr<const std::vector<CallerIdentity>> list) : list_(std::move(list)) {}
  size_t size() const { return list_->size(); }
  const CallerIdentity& operator[](size_t i) const { return (*list_)[i]; }
  std::vector<CallerIdentity>::const_iterator begin() const { return list_->begin(); }
  std::vector<CallerIdentity>::const_iterator end() const { return list_->end(); }

 private:
  std::shared_ptr<const std::vector<CallerIdentity>> list_;
};
struct CallerEntry {
  bool exception = false;
  IdentityList identities;
};
using CallerTable = std::unordered_map<std::string, CallerEntry>;  // caller key ("address" or "address#cgroup") → entry

// A token's answer body, split around expires_in (counted at answer time).
struct TokenBody {
  std::string prefix;  // up to and including `"expires_in":"`
  std::string suffix;  // from the `"` after expires_in
};
struct TokenEntry {
  // Shared by every entry of the same token: per pod (--audit-log), many pods' entries hold one token.
  std::shared_ptr<const TokenBody> body;
  int64_t expiresOn = 0;     // seconds since the epoch
  int64_t serveUntilMs = 0;  // wall clock; past it TS answers (and refreshes)
  // Answers served from this entry since TypeScript last took them (--audit-log: one entry per pod, so a count per
  // pod): the loop adds, JavaScript takes, neither locks. Shared by the copies of an entry.
  std::shared_ptr<std::atomic<uint64_t>> hits = std::make_shared<std::atomic<uint64_t>>(0);
};
// key '\n' resource → entry; entries are shared, so a table updated by copy copies pointers, not tokens.
using TokenTable = std::unordered_map<std::string, std::shared_ptr<const TokenEntry>>;

std::string TokenKey(const std::string& identity, const std::string& resource);
// The same key into a reused string.
void TokenKey(const std::string& identity, const std::string& resource, std::string& key);

// --multiple-identities (src/config/commands.ts's MultipleIdentities): with kFirst a request naming no id is
// served the first of its caller's identities (TS ordered them); with kRefuse only a caller with exactly one is.
enum class MultipleIdentities { kFirst, kRefuse };

// What a server's fast path answers by, from TypeScript at start.
struct TokenRules {
  bool metadataHeaderRequired = true;
  MultipleIdentities multipleIdentities = MultipleIdentities::kRefuse;
  std::unordered_set<std::string> apiVersions;  // request.ts's IDENTITY_API_VERSIONS
  int64_t keepAliveS = 0;                       // what a kept-alive answer says in Keep-Alive: timeout=
};

// A token request the fast path may answer, as far as the head alone tells.
struct HitQuery {
  enum class By { kOnly, kClientId, kResourceId };  // kOnly: no id given, the caller's single (or first) identity
  std::string resource;
  By by = By::kOnly;
  std::string wanted;  // the requested id, lowercased
};

// false when TS must judge the request: anything but the exact, plain, valid case.
// A reused q keeps its strings' capacity.
bool ParseHitRequest(std::string_view head, const TokenRules& rules, HitQuery& q);

// The complete 200 answer from the tables, appended to out (left as it was when false: TS must answer an
// unknown caller, an exception pod, no identity to serve, no fresh token).
bool AnswerFromTables(const HitQuery& q, const std::string& remote, bool keepAlive, const TokenRules& rules,
                      const CallerTable& callers, const TokenTable& tokens, int64_t nowMs, std::string& out);

}  // namespace imds
}  // namespace nmi
