// The native token server: an HTTP/1.1 server on its own epoll thread that
// answers the one hot case itself (a valid token request from a routed caller
// whose token is in the table) and hands every other request, as raw bytes, to
// TypeScript (src/server/native-server.ts), which answers through
// serverRespond. Each connection's state and bounds are connection.cc's, the
// parsing and the hit case http-parse.cc's; this file owns the sockets, the
// server-wide bounds (connections in total and per caller, requests waiting on
// JavaScript) and the tables.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "addon.h"
#include "connection.h"
#include "http-parse.h"

namespace nmi {
namespace {

constexpr int64_t kAcceptRetryMs = 100;  // accept4 out of descriptors or memory: the backlog waits this long

using http::RouteTable;
using http::TokenTable;

int64_t NowMs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}
int64_t MonoMs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// --rules ebpf: the cgroup that made an accepted IPv4 connection, from the eBPF
// peers map (struct peer_key in bpf/nmi.bpf.c); 0 when none was recorded.
uint64_t PeerCgroup(int mapFd, int fd, const sockaddr_in& peer) {
  sockaddr_in local{};
  socklen_t len = sizeof local;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0 || local.sin_family != AF_INET) return 0;
  struct {
    uint32_t srcIp, dstIp;
    uint16_t srcPort, dstPort;
  } key = {peer.sin_addr.s_addr, local.sin_addr.s_addr, peer.sin_port, local.sin_port};
  uint64_t cgroup = 0;
  bpf_attr attr{};
  attr.map_fd = static_cast<uint32_t>(mapFd);
  attr.key = reinterpret_cast<uintptr_t>(&key);
  attr.value = reinterpret_cast<uintptr_t>(&cgroup);
  if (syscall(__NR_bpf, BPF_MAP_LOOKUP_ELEM, &attr, sizeof attr) != 0) return 0;
  return cgroup;
}

// A connection and its socket.
struct Socket : conn::Connection {
  Socket(int fd, uint64_t id, std::string remote, const conn::Limits& limits, int64_t nowMs)
      : conn::Connection(id, std::move(remote), limits, nowMs), fd(fd) {}
  int fd;
  uint32_t events = 0;
  // The head of this connection's last hit and what it asked: a pod polls with identical heads.
  std::string hitHead;
  http::HitQuery hitQuery;
};

struct Handoff {
  uint32_t serverId;  // a handoff with connId 0 says the server has stopped
  uint64_t connId;
  uint64_t requestId;
  std::string bytes;
  std::string remote;
  std::string error;  // "" or NativeHandoffError in src/native/addon.ts
};

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

void CallJs(Napi::Env env, Napi::Function fn, Handoff* data);

struct Stats {
  std::atomic<uint64_t> connections{0}, hits{0}, handedToJs{0}, malformed{0}, overflow{0},
      timeout{0}, refusedConnections{0}, busy{0}, writeTimeouts{0}, acceptErrors{0};
};

class Server : public conn::Host {
 public:
  int listenFd = -1;
  int wakeFd = -1;
  int epollFd = -1;
  int port = 0;
  size_t maxConnections = 4096;
  size_t maxConnectionsPerSource = 64;
  size_t maxHandedRequests = 1024;
  size_t maxHandedBytes = 8 * 1024 * 1024;
  conn::Limits limits;
  FixedAnswer busyAnswer, tooManyConnectionsAnswer;
  bool metadataHeaderRequired = true;
  bool firstOfSeveral = true;  // --multiple-identities first
  int peerMapFd = -1;  // --rules ebpf: callers are keyed "address#cgroup"
  uint32_t id = 0;
  Napi::ThreadSafeFunction onRequest;
  std::thread thread;
  std::mutex joinMutex;
  Stats stats;

  std::mutex tablesMutex;
  std::shared_ptr<const RouteTable> routes = std::make_shared<RouteTable>();
  std::shared_ptr<const TokenTable> tokens = std::make_shared<TokenTable>();
  // Bumped under tablesMutex after each swap: the thread takes the lock only when it moved.
  std::atomic<uint64_t> tablesVersion{0};

  std::mutex queueMutex;
  std::vector<Response> responses;
  std::atomic<bool> stopping{false};
  std::atomic<bool> hardStop{false};
  std::atomic<int64_t> drainDeadlineMs{0};

  ~Server() override {
    // process.exit() skips environment cleanup hooks: the last reference goes
    // with the static table, and a joinable std::thread would abort the exit.
    hardStop = true;
    if (wakeFd >= 0) Wake();
    Join();
    if (epollFd >= 0) close(epollFd);
    if (wakeFd >= 0) close(wakeFd);
    if (listenFd >= 0) close(listenFd);
    if (peerMapFd >= 0) close(peerMapFd);
  }

  void Wake() {
    uint64_t one = 1;
    ssize_t n = write(wakeFd, &one, sizeof one);
    (void)n;
  }

  void Run();

  // Safe from both the stop path and the at-exit hook.
  void Join() {
    std::lock_guard<std::mutex> lock(joinMutex);
    if (thread.joinable()) thread.join();
  }

  // conn::Host
  bool TryAnswer(conn::Connection& c, std::string_view head, bool keepAlive, std::string& out) override;
  bool HandOff(conn::Connection& c, uint64_t requestId, std::string bytes, std::string_view error) override;
  void AppendBusy(bool keepAlive, std::string& out) override { AppendFixed(busyAnswer, keepAlive, out); }

 private:
  std::unordered_map<uint64_t, std::unique_ptr<Socket>> conns_;
  std::unordered_map<std::string, size_t> perSource_;  // open connections by caller key
  // Requests JavaScript holds (connection, request) → bytes; they count until it answers, even for a
  // connection gone meanwhile.
  std::map<std::pair<uint64_t, uint64_t>, size_t> handed_;
  size_t handedBytes_ = 0;
  uint64_t nextConnId_ = 1;
  bool listening_ = false;
  bool acceptPaused_ = false;  // out of connection slots, descriptors or memory: new connections wait in the backlog
  int64_t acceptRetryAtMs_ = 0;  // when a pause for descriptors or memory ends
  // The thread's copy of the tables, as of tablesVersion seenTables_.
  std::shared_ptr<const RouteTable> routesNow_;
  std::shared_ptr<const TokenTable> tokensNow_;
  uint64_t seenTables_ = UINT64_MAX;
  int64_t timersCheckedMs_ = 0;
  // Monotonic, read once per wake-up: the timers it feeds count in seconds.
  int64_t nowMs_ = 0;

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

void Server::Run() {
  epoll_event evs[128];
  listening_ = true;
  while (!hardStop.load()) {
    if (stopping.load() && listening_) {
      if (!acceptPaused_) epoll_ctl(epollFd, EPOLL_CTL_DEL, listenFd, nullptr);
      close(listenFd);
      listenFd = -1;
      listening_ = false;
      // Idle keep-alive connections go now; the others after their last answer. A
      // connection that has not had its first answer is not idle: its client sent (or is
      // sending) a request, and closing would reset it. After a restart or handoff, the
      // listener lives on and new connections go to the next process.
      std::vector<uint64_t> idle;
      for (auto& [id, s] : conns_)
        if (s->IdleKeepAlive()) idle.push_back(id);
      for (auto id : idle) Destroy(id);
    }
    if (!listening_ && (conns_.empty() || MonoMs() >= drainDeadlineMs.load())) break;
    int n = epoll_wait(epollFd, evs, 128, 100);
    if (n < 0 && errno != EINTR) break;
    nowMs_ = MonoMs();
    for (int i = 0; i < n; i++) {
      uint64_t tag = evs[i].data.u64;
      if (tag == 0) {
        if (listening_) Accept();
        continue;
      }
      if (tag == 1) {
        uint64_t v;
        ssize_t r = read(wakeFd, &v, sizeof v);
        (void)r;
        DrainResponses();
        continue;
      }
      auto it = conns_.find(tag);
      if (it == conns_.end()) continue;
      // Both directions are gone (a reset, or our FIN answered): nothing more can be written.
      if (evs[i].events & (EPOLLERR | EPOLLHUP)) {
        Destroy(tag);
        continue;
      }
      if (evs[i].events & EPOLLIN) OnReadable(*it->second);
      else Service(*it->second);
    }
    // Timers are seconds long: walking every connection after each wake-up cost more than it bought.
    if (nowMs_ - timersCheckedMs_ >= 100) {
      timersCheckedMs_ = nowMs_;
      CheckTimers();
    }
    RefreshTables();  // lets a replaced table go within one wake-up
  }
  std::vector<uint64_t> all;
  for (auto& [id, s] : conns_) all.push_back(id);
  for (auto id : all) Destroy(id);
  if (hardStop.load()) return;  // the environment is going away: no JS left to tell
  auto* done = new Handoff{this->id, 0, 0, {}, {}, {}};
  if (onRequest.BlockingCall(done, CallJs) != napi_ok) delete done;
  onRequest.Release();
}

void Server::PauseAccept(bool paused) {
  if (paused == acceptPaused_ || !listening_) return;
  acceptPaused_ = paused;
  if (paused) {
    epoll_ctl(epollFd, EPOLL_CTL_DEL, listenFd, nullptr);
    return;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  epoll_ctl(epollFd, EPOLL_CTL_ADD, listenFd, &ev);
}

void Server::Accept() {
  while (conns_.size() < maxConnections) {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    int fd = accept4(listenFd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // The listener stays readable: without a pause this thread would spin on the same error.
        stats.acceptErrors++;
        acceptRetryAtMs_ = nowMs_ + kAcceptRetryMs;
        PauseAccept(true);
      }
      return;  // EAGAIN, or a transient error: the next readiness retries
    }
    char text[INET6_ADDRSTRLEN] = "";
    if (addr.ss_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&addr)->sin_addr, text, sizeof text);
    } else if (addr.ss_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&addr)->sin6_addr, text, sizeof text);
    }
    std::string remote = text;
    if (remote.rfind("::ffff:", 0) == 0 && remote.find('.') != std::string::npos) remote = remote.substr(7);
    if (peerMapFd >= 0) {
      uint64_t cgroup = addr.ss_family == AF_INET ? PeerCgroup(peerMapFd, fd, reinterpret_cast<sockaddr_in&>(addr)) : 0;
      remote += "#" + std::to_string(cgroup);
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // as node's http server: answers leave at once
    auto s = std::make_unique<Socket>(fd, ++nextConnId_, remote, limits, nowMs_);  // 0 and 1 tag the listener and the wake fd
    if (++perSource_[remote] > maxConnectionsPerSource) {
      // Answered, then closed once the caller has read it: never a reset it would take for "no IMDS here".
      stats.refusedConnections++;
      std::string answer;
      AppendFixed(tooManyConnectionsAnswer, false, answer);
      s->Refuse(answer, nowMs_);
    }
    epoll_event ev{};
    ev.events = s->events = s->WantsRead() ? static_cast<uint32_t>(EPOLLIN) : 0u;
    ev.data.u64 = s->id;
    epoll_ctl(epollFd, EPOLL_CTL_ADD, fd, &ev);
    stats.connections++;
    Socket& added = *s;
    conns_[s->id] = std::move(s);
    if (added.WantsWrite()) Service(added);
  }
  // Every slot is taken: the rest wait in the kernel's backlog, accepted as connections close.
  PauseAccept(true);
}

void Server::OnReadable(Socket& s) {
  // A read may overshoot a connection's input bound by this much: kept small, as every connection may.
  char buf[16384];
  // Level-triggered: what is left unread is reported again, once the connection wants it.
  while (s.WantsRead()) {
    ssize_t n = read(s.fd, buf, sizeof buf);
    if (n > 0) {
      s.Received(std::string_view(buf, static_cast<size_t>(n)));
      if (static_cast<size_t>(n) < sizeof buf) break;  // a short read drained the socket
      continue;
    }
    if (n == 0) {
      s.PeerClosed();
    } else if (errno == EINTR) {
      continue;
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
      Destroy(s.id);
      return;
    }
    break;
  }
  Service(s);
}

// Parses what arrived, writes what is ready, and decides whether the connection stays. A peer that
// takes answers as fast as they come gets the rest of its pipelined requests in the same turn.
void Server::Service(Socket& s) {
  while (true) {
    size_t before = s.BufferedInput();
    s.Pump(*this, nowMs_);
    if (!Flush(s)) return;
    bool consumed = s.BufferedInput() < before;
    if (!consumed || s.WantsWrite() || !s.TakesRequests() || s.BufferedInput() == 0) break;
  }
  if (s.ShouldShutdown()) {
    // The last answer is out. A peer that asked and has nothing more waiting here gets our FIN at once
    // (Connection: close, the common case). Otherwise our FIN, then its own awaited (bounded): bytes it
    // still sends must not make the kernel reset the connection before it has read the answer.
    int unread = 0;
    if (!s.Refused() && ioctl(s.fd, FIONREAD, &unread) == 0 && unread == 0) {
      Destroy(s.id);
      return;
    }
    shutdown(s.fd, SHUT_WR);
    s.StartLinger(nowMs_);
  }
  if (s.Finished(stopping.load())) {
    Destroy(s.id);
    return;
  }
  UpdateEvents(s);
}

// False when the connection is gone.
bool Server::Flush(Socket& s) {
  while (s.WantsWrite()) {
    std::string_view out = s.Unsent();
    ssize_t n = send(s.fd, out.data(), out.size(), MSG_NOSIGNAL);
    if (n > 0) {
      s.Sent(static_cast<size_t>(n), nowMs_);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      break;
    } else {
      Destroy(s.id);
      return false;
    }
  }
  return true;
}

bool Server::HandOff(conn::Connection& c, uint64_t requestId, std::string bytes, std::string_view error) {
  size_t size = bytes.size();
  if (handed_.size() >= maxHandedRequests || handedBytes_ + size > maxHandedBytes) {
    stats.busy++;
    return false;
  }
  if (error == "malformed") stats.malformed++;
  else if (error == "overflow") stats.overflow++;
  else if (error == "timeout") stats.timeout++;
  auto* h = new Handoff{id, c.id, requestId, std::move(bytes), c.remote, std::string(error)};
  if (onRequest.NonBlockingCall(h, CallJs) != napi_ok) {
    // JS is gone or its queue is full: nobody will answer this request.
    delete h;
    stats.busy++;
    return false;
  }
  stats.handedToJs++;
  handed_[{c.id, requestId}] = size;
  handedBytes_ += size;
  return true;
}

void Server::AppendFixed(const FixedAnswer& a, bool keepAlive, std::string& out) {
  out += a.head;
  http::AppendDateAndConnection(NowMs(), keepAlive, out);
  out += a.body;
}

void Server::RefreshTables() {
  uint64_t version = tablesVersion.load(std::memory_order_acquire);
  if (version == seenTables_) return;
  std::lock_guard<std::mutex> lock(tablesMutex);
  routesNow_ = routes;
  tokensNow_ = tokens;
  seenTables_ = version;
}

// Heads longer than this are parsed every time rather than kept per connection.
constexpr size_t kMaxRememberedHead = 1024;

bool Server::TryAnswer(conn::Connection& c, std::string_view head, bool keepAlive, std::string& out) {
  auto& s = static_cast<Socket&>(c);
  // ParseHitRequest depends on the head's bytes alone (and a per-server flag): an equal head asks the same.
  if (s.hitHead.empty() || head != s.hitHead) {
    s.hitHead.clear();
    if (!http::ParseHitRequest(head, metadataHeaderRequired, s.hitQuery)) return false;
    if (head.size() <= kMaxRememberedHead) s.hitHead.assign(head.data(), head.size());
  }
  // A swap that returned before this request was read is seen: the version is read after the read().
  RefreshTables();
  if (!http::AnswerFromTables(s.hitQuery, s.remote, keepAlive, firstOfSeveral, *routesNow_, *tokensNow_, NowMs(), out))
    return false;
  stats.hits++;
  return true;
}

void Server::UpdateEvents(Socket& s) {
  uint32_t want = 0;
  if (s.WantsRead()) want |= EPOLLIN;
  if (s.WantsWrite()) want |= EPOLLOUT;
  if (want == s.events) return;
  s.events = want;
  epoll_event ev{};
  ev.events = want;
  ev.data.u64 = s.id;
  epoll_ctl(epollFd, EPOLL_CTL_MOD, s.fd, &ev);
}

void Server::Destroy(uint64_t id) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Socket& s = *it->second;
  close(s.fd);  // leaves the epoll set with it: no descriptor of it is shared
  auto source = perSource_.find(s.remote);
  if (source != perSource_.end() && --source->second == 0) perSource_.erase(source);
  conns_.erase(it);
  if (acceptRetryAtMs_ == 0) PauseAccept(false);
}

void Server::DrainResponses() {
  std::vector<Response> batch;
  {
    std::lock_guard<std::mutex> lock(queueMutex);
    batch.swap(responses);
  }
  std::unordered_set<uint64_t> touched;
  for (auto& r : batch) {
    auto handed = handed_.find({r.connId, r.requestId});
    if (handed != handed_.end()) {
      handedBytes_ -= handed->second;
      handed_.erase(handed);
    }
    auto it = conns_.find(r.connId);
    if (it == conns_.end()) continue;  // the client went away meanwhile
    it->second->Answer(r.requestId, std::move(r.bytes), r.close);
    touched.insert(r.connId);
  }
  for (auto id : touched) {
    auto it = conns_.find(id);
    if (it != conns_.end()) Service(*it->second);
  }
}

void Server::CheckTimers() {
  int64_t now = nowMs_;
  if (acceptRetryAtMs_ != 0 && now >= acceptRetryAtMs_) {
    acceptRetryAtMs_ = 0;
    if (conns_.size() < maxConnections) PauseAccept(false);
  }
  using Timer = conn::Connection::Timer;
  std::vector<uint64_t> ended, timedOut;
  for (auto& [id, s] : conns_) {
    switch (s->CheckTimers(*this, now)) {
      case Timer::kNone:
        break;
      case Timer::kHeaderTimeout:
        timedOut.push_back(id);
        break;
      case Timer::kWriteTimeout:
        stats.writeTimeouts++;
        ended.push_back(id);
        break;
      case Timer::kClose:
        ended.push_back(id);
        break;
    }
  }
  for (auto id : ended) Destroy(id);
  for (auto id : timedOut) {
    auto it = conns_.find(id);
    if (it != conns_.end()) Service(*it->second);
  }
}

// ---- JS surface ----

std::mutex gServersMutex;
std::unordered_map<uint32_t, std::shared_ptr<Server>> gServers;
uint32_t gNextServer = 1;

std::shared_ptr<Server> FindServer(const Napi::Value& v) {
  if (!v.IsNumber()) return nullptr;
  std::lock_guard<std::mutex> lock(gServersMutex);
  auto it = gServers.find(v.As<Napi::Number>().Uint32Value());
  return it == gServers.end() ? nullptr : it->second;
}

Napi::Value Usage(Napi::Env env, const char* usage) {
  Napi::TypeError::New(env, std::string("Usage: ") + usage).ThrowAsJavaScriptException();
  return env.Undefined();
}

std::string ErrnoText(const char* what) { return std::string(what) + ": " + strerror(errno); }

// At environment teardown: stop the thread without waiting for JS. Registered
// after the server's thread-safe function, so it runs before node closes it.
void StopAtExit(void* arg) {
  auto* s = static_cast<Server*>(arg);
  s->hardStop = true;
  s->Wake();
  s->Join();
}

void CallJs(Napi::Env env, Napi::Function fn, Handoff* data) {
  std::unique_ptr<Handoff> owned(data);
  if (env == nullptr || fn == nullptr) return;
  if (data->connId == 0) {
    // The thread has finished: join it and forget the server, then tell JS.
    std::shared_ptr<Server> s;
    {
      std::lock_guard<std::mutex> lock(gServersMutex);
      auto it = gServers.find(data->serverId);
      if (it != gServers.end()) {
        s = it->second;
        gServers.erase(it);
      }
    }
    if (s) {
      s->Join();
      napi_remove_env_cleanup_hook(env, StopAtExit, s.get());
    }
    fn.Call({Napi::Number::New(env, 0), Napi::Number::New(env, 0), env.Null(), Napi::String::New(env, ""),
             Napi::String::New(env, "stopped")});
    return;
  }
  fn.Call({Napi::Number::New(env, static_cast<double>(data->connId)),
           Napi::Number::New(env, static_cast<double>(data->requestId)),
           Napi::Buffer<char>::Copy(env, data->bytes.data(), data->bytes.size()), Napi::String::New(env, data->remote),
           data->error.empty() ? env.Null() : Napi::String::New(env, data->error)});
}

}  // namespace

static const char* const kStartUsage =
    "serverStart({fd, maxConnections, maxConnectionsPerSource, maxHeaderBytes, headerTimeoutMs, writeTimeoutMs, "
    "maxUnsentBytes, maxHandedBytesPerConnection, maxHandedRequests, maxHandedBytes, metadataHeaderRequired, "
    "firstOfSeveral, busyAnswer: [head, body], tooManyConnectionsAnswer: [head, body], peerMapFd?}, onRequest)";

// A [head, body] pair of strings.
static bool ReadFixedAnswer(const Napi::Value& v, FixedAnswer* out) {
  if (!v.IsArray()) return false;
  Napi::Array a = v.As<Napi::Array>();
  Napi::Value head = a[0u], body = a[1u];
  if (a.Length() != 2 || !head.IsString() || !body.IsString()) return false;
  out->head = head.As<Napi::String>();
  out->body = body.As<Napi::String>();
  return true;
}

Napi::Value ServerStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[0].IsObject() || !info[1].IsFunction()) return Usage(env, kStartUsage);
  Napi::Object o = info[0].As<Napi::Object>();
  for (const char* k : {"fd", "maxConnections", "maxConnectionsPerSource", "maxHeaderBytes", "headerTimeoutMs",
                        "writeTimeoutMs", "maxUnsentBytes", "maxHandedBytesPerConnection", "maxHandedRequests",
                        "maxHandedBytes"})
    if (!o.Get(k).IsNumber()) return Usage(env, kStartUsage);
  if (!o.Get("metadataHeaderRequired").IsBoolean() || !o.Get("firstOfSeveral").IsBoolean())
    return Usage(env, kStartUsage);

  auto s = std::make_shared<Server>();
  if (!ReadFixedAnswer(o.Get("busyAnswer"), &s->busyAnswer) ||
      !ReadFixedAnswer(o.Get("tooManyConnectionsAnswer"), &s->tooManyConnectionsAnswer))
    return Usage(env, kStartUsage);
  auto number = [&](const char* k) { return o.Get(k).As<Napi::Number>(); };
  s->maxConnections = number("maxConnections").Uint32Value();
  s->maxConnectionsPerSource = number("maxConnectionsPerSource").Uint32Value();
  s->maxHandedRequests = number("maxHandedRequests").Uint32Value();
  s->maxHandedBytes = number("maxHandedBytes").Uint32Value();
  s->limits.maxHeaderBytes = number("maxHeaderBytes").Uint32Value();
  s->limits.headerTimeoutMs = number("headerTimeoutMs").Int64Value();
  s->limits.writeTimeoutMs = number("writeTimeoutMs").Int64Value();
  s->limits.maxUnsentBytes = number("maxUnsentBytes").Uint32Value();
  s->limits.maxHandedBytes = number("maxHandedBytesPerConnection").Uint32Value();
  s->metadataHeaderRequired = o.Get("metadataHeaderRequired").As<Napi::Boolean>();
  s->firstOfSeveral = o.Get("firstOfSeveral").As<Napi::Boolean>();
  // The server keeps its own descriptor of the map: the caller's may be closed first.
  if (o.Get("peerMapFd").IsNumber()) {
    s->peerMapFd = fcntl(o.Get("peerMapFd").As<Napi::Number>().Int32Value(), F_DUPFD_CLOEXEC, 0);
    if (s->peerMapFd < 0) {
      Napi::Error::New(env, std::string("serverStart: peerMapFd: ") + strerror(errno)).ThrowAsJavaScriptException();
      return env.Undefined();
    }
  }
  // A listening socket made (or adopted) by src/net/listeners.ts; the server owns it from here.
  s->listenFd = o.Get("fd").As<Napi::Number>().Int32Value();
  int flags = fcntl(s->listenFd, F_GETFL);
  if (flags < 0 || fcntl(s->listenFd, F_SETFL, flags | O_NONBLOCK) < 0) {
    Napi::Error::New(env, ErrnoText("serverStart: fd")).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  sockaddr_storage addr{};
  socklen_t len;
  auto* a4 = reinterpret_cast<sockaddr_in*>(&addr);
  auto* a6 = reinterpret_cast<sockaddr_in6*>(&addr);
  len = sizeof addr;
  getsockname(s->listenFd, reinterpret_cast<sockaddr*>(&addr), &len);
  s->port = ntohs(addr.ss_family == AF_INET ? a4->sin_port : a6->sin6_port);
  s->wakeFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  s->epollFd = epoll_create1(EPOLL_CLOEXEC);
  if (s->wakeFd < 0 || s->epollFd < 0) {
    Napi::Error::New(env, ErrnoText("serverStart: epoll")).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  epoll_ctl(s->epollFd, EPOLL_CTL_ADD, s->listenFd, &ev);
  ev.data.u64 = 1;
  epoll_ctl(s->epollFd, EPOLL_CTL_ADD, s->wakeFd, &ev);

  // Bounded as the requests JavaScript may hold, and one more for "stopped".
  s->onRequest = Napi::ThreadSafeFunction::New(env, info[1].As<Napi::Function>(), "nmi-native-server",
                                               s->maxHandedRequests + 1, 1);
  napi_add_env_cleanup_hook(env, StopAtExit, s.get());
  uint32_t id;
  {
    std::lock_guard<std::mutex> lock(gServersMutex);
    id = gNextServer++;
    gServers[id] = s;
  }
  s->id = id;
  Server* raw = s.get();
  s->thread = std::thread([raw] { raw->Run(); });
  Napi::Object result = Napi::Object::New(env);
  result.Set("id", Napi::Number::New(env, id));
  result.Set("port", Napi::Number::New(env, s->port));
  return result;
}

Napi::Value ServerRespond(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* usage = "serverRespond(server, connId, requestId, bytes: Buffer, close: boolean)";
  if (info.Length() != 5 || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsBuffer() || !info[4].IsBoolean())
    return Usage(env, usage);
  auto s = FindServer(info[0]);
  if (!s) return env.Undefined();  // stopped meanwhile: the answer has nowhere to go
  auto buf = info[3].As<Napi::Buffer<char>>();
  {
    std::lock_guard<std::mutex> lock(s->queueMutex);
    s->responses.push_back(Response{static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value()),
                                    static_cast<uint64_t>(info[2].As<Napi::Number>().Int64Value()),
                                    std::string(buf.Data(), buf.Length()), info[4].As<Napi::Boolean>()});
  }
  s->Wake();
  return env.Undefined();
}

// serverSetRoutes(server, [[[key, clientIdLower, resourceIdLower], ...], ...], [[address, exception, list], ...]):
// each route names its identities by index into the lists, so routes with the same identities share one list.
Napi::Value ServerSetRoutes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* usage = "serverSetRoutes(server, [[[key, clientIdLower, resourceIdLower]]], [[address, exception, list]])";
  if (info.Length() != 3 || !info[1].IsArray() || !info[2].IsArray()) return Usage(env, usage);
  auto s = FindServer(info[0]);
  if (!s) return env.Undefined();
  std::vector<http::IdentityList> lists;
  Napi::Array listRows = info[1].As<Napi::Array>();
  for (uint32_t i = 0; i < listRows.Length(); i++) {
    Napi::Value item = listRows[i];
    if (!item.IsArray()) return Usage(env, usage);
    Napi::Array ids = item.As<Napi::Array>();
    auto list = std::make_shared<std::vector<http::RouteIdentity>>();
    list->reserve(ids.Length());
    for (uint32_t j = 0; j < ids.Length(); j++) {
      Napi::Value id = ids[j];
      if (!id.IsArray()) return Usage(env, usage);
      Napi::Array t = id.As<Napi::Array>();
      Napi::Value k = t[0u], c = t[1u], rid = t[2u];
      if (!k.IsString() || !c.IsString() || !rid.IsString()) return Usage(env, usage);
      list->push_back(http::RouteIdentity{k.As<Napi::String>(), c.As<Napi::String>(), rid.As<Napi::String>()});
    }
    lists.emplace_back(std::move(list));
  }
  auto table = std::make_shared<RouteTable>();
  Napi::Array rows = info[2].As<Napi::Array>();
  table->reserve(rows.Length());
  for (uint32_t i = 0; i < rows.Length(); i++) {
    Napi::Value row = rows[i];
    if (!row.IsArray()) return Usage(env, usage);
    Napi::Array r = row.As<Napi::Array>();
    Napi::Value addr = r[0u], exc = r[1u], list = r[2u];
    if (!addr.IsString() || !exc.IsBoolean() || !list.IsNumber()) return Usage(env, usage);
    uint32_t index = list.As<Napi::Number>().Uint32Value();
    if (index >= lists.size()) return Usage(env, usage);
    (*table)[addr.As<Napi::String>()] = http::Route{exc.As<Napi::Boolean>(), lists[index]};
  }
  std::lock_guard<std::mutex> lock(s->tablesMutex);
  s->routes = std::move(table);
  s->tablesVersion.fetch_add(1, std::memory_order_release);
  return env.Undefined();
}

// serverUpdateTokens(server, [[identityKey, resource, prefix, suffix, expiresOn, serveUntilMs], ...], [[identityKey, resource], ...]):
// adds or replaces the first list's tokens and removes the second's, in one swap. Only what changed
// crosses from JS; the copy made here shares every unchanged entry with the table it replaces.
Napi::Value ServerUpdateTokens(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* usage =
      "serverUpdateTokens(server, [[identityKey, resource, prefix, suffix, expiresOn, serveUntilMs]], [[identityKey, resource]])";
  if (info.Length() != 3 || !info[1].IsArray() || !info[2].IsArray()) return Usage(env, usage);
  auto s = FindServer(info[0]);
  if (!s) return env.Undefined();
  std::vector<std::pair<std::string, std::shared_ptr<const http::TokenEntry>>> upserts;
  Napi::Array rows = info[1].As<Napi::Array>();
  upserts.reserve(rows.Length());
  for (uint32_t i = 0; i < rows.Length(); i++) {
    Napi::Value row = rows[i];
    if (!row.IsArray()) return Usage(env, usage);
    Napi::Array r = row.As<Napi::Array>();
    Napi::Value k = r[0u], res = r[1u], pre = r[2u], suf = r[3u], exp = r[4u], until = r[5u];
    if (!k.IsString() || !res.IsString() || !pre.IsString() || !suf.IsString() || !exp.IsNumber() || !until.IsNumber())
      return Usage(env, usage);
    upserts.emplace_back(http::TokenKey(k.As<Napi::String>(), res.As<Napi::String>()),
                         std::make_shared<const http::TokenEntry>(http::TokenEntry{
                             pre.As<Napi::String>(), suf.As<Napi::String>(), exp.As<Napi::Number>().Int64Value(),
                             until.As<Napi::Number>().Int64Value()}));
  }
  std::vector<std::string> removals;
  Napi::Array keys = info[2].As<Napi::Array>();
  for (uint32_t i = 0; i < keys.Length(); i++) {
    Napi::Value row = keys[i];
    if (!row.IsArray()) return Usage(env, usage);
    Napi::Array r = row.As<Napi::Array>();
    Napi::Value k = r[0u], res = r[1u];
    if (!k.IsString() || !res.IsString()) return Usage(env, usage);
    removals.push_back(http::TokenKey(k.As<Napi::String>(), res.As<Napi::String>()));
  }
  std::shared_ptr<const TokenTable> current;
  {
    std::lock_guard<std::mutex> lock(s->tablesMutex);
    current = s->tokens;
  }
  // Only this (JS) thread writes the table, so nothing changes it between the read above and the swap below.
  auto table = std::make_shared<TokenTable>(*current);
  for (auto& key : removals) table->erase(key);
  for (auto& [key, entry] : upserts) (*table)[key] = std::move(entry);
  std::lock_guard<std::mutex> lock(s->tablesMutex);
  s->tokens = std::move(table);
  s->tablesVersion.fetch_add(1, std::memory_order_release);
  return env.Undefined();
}

// serverStop(server, drainMs): stops accepting, lets queued answers go out (at
// most drainMs), closes every connection; onRequest then gets error "stopped".
Napi::Value ServerStop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[1].IsNumber()) return Usage(env, "serverStop(server, drainMs)");
  auto s = FindServer(info[0]);
  if (!s || s->stopping.load()) return Napi::Boolean::New(env, false);
  s->drainDeadlineMs = MonoMs() + info[1].As<Napi::Number>().Int64Value();
  s->stopping = true;
  s->Wake();
  return Napi::Boolean::New(env, true);
}

Napi::Value ServerStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = FindServer(info[0]);
  if (!s) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  auto put = [&](const char* k, const std::atomic<uint64_t>& v) { o.Set(k, Napi::Number::New(env, static_cast<double>(v.load()))); };
  put("connections", s->stats.connections);
  put("hits", s->stats.hits);
  put("handedToJs", s->stats.handedToJs);
  put("malformed", s->stats.malformed);
  put("overflow", s->stats.overflow);
  put("timeout", s->stats.timeout);
  put("refusedConnections", s->stats.refusedConnections);
  put("busy", s->stats.busy);
  put("writeTimeouts", s->stats.writeTimeouts);
  put("acceptErrors", s->stats.acceptErrors);
  return o;
}

}  // namespace nmi
