// The native token server's loop: an HTTP/1.1 server on its own epoll thread
// that answers the one hot case itself (a valid token request from a caller in
// the caller table whose token is in the token table) and defers every other
// request, as raw bytes, to TypeScript (src/server/native-server.ts), which
// answers through Server::Respond. Each connection's state and bounds are
// connection.cc's, the framing http-parse.cc's, the hit case token-request.cc's;
// server.cc owns the sockets, the server-wide bounds (connections in total and
// per caller, requests waiting on JavaScript) and the tables. The calls
// JavaScript makes are server-js.cc's.
#pragma once
#include <napi.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "connection.h"
#include "token-request.h"

namespace nmi {
namespace server {

// A request deferred to JavaScript, or (connId 0) word that the server has stopped.
struct Deferred {
  uint32_t serverId;
  uint64_t connId;
  uint64_t requestId;
  std::string bytes;
  std::string remote;
  std::string error;  // "" or NativeDeferError in src/native/addon.ts
};

// JavaScript's answer to a deferred request.
struct Response {
  uint64_t connId;
  uint64_t requestId;
  std::string bytes;
  bool close;
};

// An answer nmi writes without JavaScript (a 503, a 429): TypeScript's status line and headers, and body;
// Date and Connection are added here as node adds them.
struct FixedAnswer {
  std::string head;
  std::string body;
};

struct Stats {
  std::atomic<uint64_t> connections{0}, hits{0}, deferredToJs{0}, malformed{0}, overflow{0},
      timeout{0}, refusedConnections{0}, busy{0}, writeTimeouts{0}, acceptErrors{0};
};

// Delivers a Deferred on the JavaScript thread (server-js.cc); owns it.
void CallJs(Napi::Env env, Napi::Function fn, Deferred* data);

struct Socket;

class Server : public conn::Host {
 public:
  // Set before Open, from TypeScript's options (src/config/limits.ts, the flags).
  size_t maxConnections = 0;
  size_t maxConnectionsPerSource = 0;
  size_t maxDeferredRequests = 0;
  size_t maxDeferredBytes = 0;
  conn::Limits limits;
  imds::TokenRules rules;
  FixedAnswer busyAnswer, tooManyConnectionsAnswer;
  bool countHits = false;  // --audit-log: JavaScript takes the token entries' hit counts (TakeHits)
  int peerMapFd = -1;  // --rules ebpf: callers are keyed "address#cgroup"; the server owns this descriptor
  uint32_t id = 0;
  Napi::ThreadSafeFunction onRequest;  // where deferred requests go
  Stats stats;

  Server();
  ~Server() override;

  // Takes a listening socket (made or adopted by src/lifecycle/listeners.ts), which the server owns from
  // here, and readies the loop; "" or what failed.
  std::string Open(int fd);
  int Port() const { return port_; }
  // Runs the loop on its own thread.
  void Start();
  // Stops accepting, lets queued answers go out (at most drainMs), closes every connection, then tells
  // JavaScript "stopped"; false when already stopping.
  bool Stop(int64_t drainMs);
  // At environment teardown: ends the thread at once, telling JavaScript nothing.
  void StopNow();
  // Safe from both the stop path and the at-exit hook.
  void Join();
  // Queues JavaScript's answer; the loop writes it.
  void Respond(Response r);
  // Replaces the caller table in one swap.
  void SetCallers(std::shared_ptr<const imds::CallerTable> callers);
  // Adds or replaces `upserts` and removes `removals` from the token table, in one swap. JavaScript's thread only.
  void UpdateTokens(std::vector<std::pair<std::string, std::shared_ptr<const imds::TokenEntry>>> upserts,
                    const std::vector<std::string>& removals);
  // The body with this text: an existing one when some entry holds it (entries of one token, per pod, share it).
  // JavaScript's thread only.
  std::shared_ptr<const imds::TokenBody> Body(std::string prefix, std::string suffix);
  // The hits of each token entry since the last call (by token key; only those with any), including entries
  // replaced or removed meanwhile. JavaScript's thread only.
  std::vector<std::pair<std::string, uint64_t>> TakeHits();

  // conn::Host
  bool TryAnswer(conn::Connection& c, std::string_view head, bool keepAlive, std::string& out) override;
  bool Defer(conn::Connection& c, uint64_t requestId, std::string bytes, std::string_view error) override;
  void AppendBusy(bool keepAlive, std::string& out) override { AppendFixed(busyAnswer, keepAlive, out); }

 private:
  int listenFd_ = -1;
  int wakeFd_ = -1;
  int epollFd_ = -1;
  int port_ = 0;
  std::thread thread_;
  std::mutex joinMutex_;

  std::mutex tablesMutex_;
  std::shared_ptr<const imds::CallerTable> callers_ = std::make_shared<imds::CallerTable>();
  std::shared_ptr<const imds::TokenTable> tokens_ = std::make_shared<imds::TokenTable>();
  // Bumped under tablesMutex_ after each swap: the thread takes the lock only when it moved.
  std::atomic<uint64_t> tablesVersion_{0};
  // countHits: entries swapped out by UpdateTokens, whose counts TakeHits still owes JavaScript; kept until
  // the take after next, as the loop may add to one it read just before the swap. JavaScript's thread only.
  using Retired = std::vector<std::pair<std::string, std::shared_ptr<const imds::TokenEntry>>>;
  Retired retired_, retiredBefore_;
  // Body's index, by a hash of the text; swept of bodies no entry holds once it outgrows the table. JavaScript's thread only.
  std::unordered_multimap<size_t, std::weak_ptr<const imds::TokenBody>> bodies_;

  std::mutex queueMutex_;
  std::vector<Response> responses_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> hardStop_{false};
  std::atomic<int64_t> drainDeadlineMs_{0};

  // The loop thread's own, from here on.
  std::unordered_map<uint64_t, std::unique_ptr<Socket>> conns_;
  std::unordered_map<std::string, size_t> perSource_;  // open connections by caller key
  // Requests JavaScript holds (connection, request) → bytes; they count until it answers, even for a
  // connection gone meanwhile.
  std::map<std::pair<uint64_t, uint64_t>, size_t> deferred_;
  size_t deferredBytes_ = 0;
  uint64_t nextConnId_ = 1;
  bool listening_ = false;
  bool acceptPaused_ = false;  // out of connection slots, descriptors or memory: new connections wait in the backlog
  int64_t acceptRetryAtMs_ = 0;  // when a pause for descriptors or memory ends
  // The thread's copy of the tables, as of tablesVersion_ seenTables_.
  std::shared_ptr<const imds::CallerTable> callersNow_;
  std::shared_ptr<const imds::TokenTable> tokensNow_;
  uint64_t seenTables_ = UINT64_MAX;
  int64_t timersCheckedMs_ = 0;
  // Monotonic, read once per wake-up: the timers it feeds count in seconds.
  int64_t nowMs_ = 0;

  void Wake();
  void Run();
  void Accept();
  void PauseAccept(bool paused);
  void OnReadable(Socket& s);
  void Service(Socket& s);
  bool Flush(Socket& s);
  void UpdateEvents(Socket& s);
  void Destroy(uint64_t id);
  void DrainResponses();
  void CheckTimers();
  void RefreshTables();
  void AppendFixed(const FixedAnswer& a, bool keepAlive, std::string& out);
};

}  // namespace server
}  // namespace nmi
