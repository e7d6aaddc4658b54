// The native token server: an HTTP/1.1 server on its own epoll thread that
// answers the one hot case itself (a valid token request from a routed caller
// whose token is in the table) and hands every other request, as raw bytes, to
// TypeScript (src/server/native-server.ts), which answers through
// serverRespond. The parsing and the hit case itself are http-parse.cc; this
// file owns the sockets and the tables. Answers on a connection leave in
// request order (pipelining), whoever wrote them.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "addon.h"
#include "http-parse.h"

namespace nmi {
namespace {

constexpr size_t kMaxPendingPerConn = 32;      // pipelined requests awaiting an answer
constexpr int64_t kKeepAliveMs = 5000;         // idle keep-alive connection, as node's js server

using http::Framing;
using http::kMaxBodyBytes;
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

struct Slot {
  uint64_t requestId;
  bool ready = false;
  bool close = false;
  std::string bytes;
};

struct Conn {
  int fd = -1;
  uint64_t id = 0;
  std::string remote;
  std::string in;
  size_t inStart = 0;  // bytes of `in` already taken, dropped once per Pump (always 0 outside it)
  std::string out;
  size_t outOffset = 0;
  std::deque<Slot> slots;
  uint64_t nextRequestId = 1;
  bool noMoreRequests = false;  // a Connection: close request, an error, or EOF was seen
  bool closeAfterFlush = false;
  bool peerClosed = false;
  uint32_t events = 0;
  int64_t partialSinceMs = 0;  // monotonic; 0 when no request is partly received
  int64_t idleSinceMs = 0;
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
  std::string error;  // "", "malformed", "overflow", "timeout", "body"
};

struct Response {
  uint64_t connId;
  uint64_t requestId;
  std::string bytes;
  bool close;
};

void CallJs(Napi::Env env, Napi::Function fn, Handoff* data);

struct Stats {
  std::atomic<uint64_t> connections{0}, requests{0}, hits{0}, handedToJs{0}, malformed{0}, overflow{0},
      timeout{0}, refusedConnections{0};
};

class Server {
 public:
  int listenFd = -1;
  int wakeFd = -1;
  int epollFd = -1;
  int port = 0;
  size_t maxConnections = 4096;
  size_t maxHeaderBytes = 16 * 1024;
  int64_t headerTimeoutMs = 10000;
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

  ~Server() {
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

 private:
  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns_;
  uint64_t nextConnId_ = 1;
  // The thread's copy of the tables, as of tablesVersion seenTables_.
  std::shared_ptr<const RouteTable> routesNow_;
  std::shared_ptr<const TokenTable> tokensNow_;
  uint64_t seenTables_ = UINT64_MAX;
  int64_t timersCheckedMs_ = 0;

  void Accept();
  void OnReadable(Conn& c);
  bool ProcessOne(Conn& c);
  void HandOff(Conn& c, std::string bytes, const std::string& error);
  void Pump(Conn& c);
  void UpdateEvents(Conn& c);
  void Destroy(uint64_t id);
  void DrainResponses();
  void CheckTimers();
  void RefreshTables();
  bool TryAnswer(Conn& c, std::string_view head, bool keepAlive, std::string& out);
};

void Server::Run() {
  epoll_event evs[128];
  bool listening = true;
  while (!hardStop.load()) {
    if (stopping.load() && listening) {
      epoll_ctl(epollFd, EPOLL_CTL_DEL, listenFd, nullptr);
      close(listenFd);
      listenFd = -1;
      listening = false;
      // Idle keep-alive connections go now; the others after their last answer. A
      // connection that has not had its first answer is not idle: its client sent (or is
      // sending) a request, and closing would reset it. After a restart or handoff, the
      // listener lives on and new connections go to the next process.
      std::vector<uint64_t> idle;
      for (auto& [id, c] : conns_) {
        bool answeredOnce = c->nextRequestId > 1;
        bool nothingPending = c->slots.empty() && c->out.size() == c->outOffset && c->in.size() == c->inStart;
        if (answeredOnce && nothingPending) idle.push_back(id);
      }
      for (auto id : idle) Destroy(id);
    }
    if (!listening && (conns_.empty() || MonoMs() >= drainDeadlineMs.load())) break;
    int n = epoll_wait(epollFd, evs, 128, 250);
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < n; i++) {
      uint64_t tag = evs[i].data.u64;
      if (tag == 0) {
        if (listening) Accept();
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
      if (evs[i].events & EPOLLERR) {
        Destroy(tag);
        continue;
      }
      if (evs[i].events & (EPOLLIN | EPOLLHUP)) OnReadable(*it->second);
      it = conns_.find(tag);
      if (it != conns_.end() && (evs[i].events & EPOLLOUT)) Pump(*it->second);
    }
    // Timers are seconds long: walking every connection after each wake-up cost more than it bought.
    int64_t now = MonoMs();
    if (now - timersCheckedMs_ >= 100) {
      timersCheckedMs_ = now;
      CheckTimers();
    }
    RefreshTables();  // lets a replaced table go within one wake-up
  }
  std::vector<uint64_t> all;
  for (auto& [id, c] : conns_) all.push_back(id);
  for (auto id : all) Destroy(id);
  if (hardStop.load()) return;  // the environment is going away: no JS left to tell
  auto* done = new Handoff{this->id, 0, 0, {}, {}, {}};
  if (onRequest.NonBlockingCall(done, CallJs) != napi_ok) delete done;
  onRequest.Release();
}

void Server::Accept() {
  while (true) {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    int fd = accept4(listenFd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN, or a transient error: the next readiness retries
    if (conns_.size() >= maxConnections) {
      stats.refusedConnections++;
      close(fd);
      continue;
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
    auto c = std::make_unique<Conn>();
    c->fd = fd;
    c->id = ++nextConnId_;  // 0 and 1 tag the listener and the wake fd
    c->remote = remote;
    c->idleSinceMs = MonoMs();
    c->events = EPOLLIN;
    epoll_event ev{};
    ev.events = c->events;
    ev.data.u64 = c->id;
    epoll_ctl(epollFd, EPOLL_CTL_ADD, fd, &ev);
    stats.connections++;
    conns_[c->id] = std::move(c);
  }
}

void Server::OnReadable(Conn& c) {
  char buf[65536];
  while (true) {
    ssize_t n = read(c.fd, buf, sizeof buf);
    if (n > 0) {
      if (!c.noMoreRequests) c.in.append(buf, static_cast<size_t>(n));
      if (c.in.size() > maxHeaderBytes + kMaxBodyBytes) break;
      // A short read drained the socket; epoll is level-triggered, so a read that would say EAGAIN is saved.
      if (static_cast<size_t>(n) < sizeof buf) break;
      continue;
    }
    if (n == 0) {
      c.peerClosed = true;
    } else if (errno == EINTR) {
      continue;
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
      Destroy(c.id);
      return;
    }
    break;
  }
  Pump(c);
}

// Parses what arrived, moves answers that are next in line to the output,
// writes, and decides whether the connection stays.
void Server::Pump(Conn& c) {
  for (int round = 0; round < 1000; round++) {
    while (c.slots.size() < kMaxPendingPerConn && ProcessOne(c)) {
    }
    c.in.erase(0, c.inStart);
    c.inStart = 0;
    bool moved = false;
    while (!c.closeAfterFlush && !c.slots.empty() && c.slots.front().ready) {
      Slot& s = c.slots.front();
      c.out += s.bytes;
      moved = true;
      if (s.close) {
        c.closeAfterFlush = true;
        c.noMoreRequests = true;
        c.slots.clear();
        c.in.clear();
        break;
      }
      c.slots.pop_front();
    }
    if (!moved) break;
  }
  while (c.outOffset < c.out.size()) {
    ssize_t n = send(c.fd, c.out.data() + c.outOffset, c.out.size() - c.outOffset, MSG_NOSIGNAL);
    if (n > 0) {
      c.outOffset += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      break;
    } else {
      Destroy(c.id);
      return;
    }
  }
  if (c.outOffset == c.out.size()) {
    c.out.clear();
    c.outOffset = 0;
    if (c.slots.empty()) {
      // Stopping: a connection goes once nothing of it is left to answer.
      if (c.closeAfterFlush || c.peerClosed || (stopping.load() && (c.noMoreRequests || c.in.empty()))) {
        Destroy(c.id);
        return;
      }
      c.idleSinceMs = MonoMs();
    }
  }
  if (c.in.empty()) c.partialSinceMs = 0;
  else if (c.partialSinceMs == 0) c.partialSinceMs = MonoMs();
  UpdateEvents(c);
}

// Takes one complete request off c.in (from c.inStart, parsed in place); false when there is none (yet).
bool Server::ProcessOne(Conn& c) {
  if (c.noMoreRequests || c.closeAfterFlush) return false;
  std::string_view in(c.in);
  in.remove_prefix(c.inStart);
  size_t skip = http::LeadingEmptyLines(in);
  c.inStart += skip;
  in.remove_prefix(skip);
  if (in.empty()) return false;
  Framing f = http::FrameRequest(in, maxHeaderBytes);
  switch (f.kind) {
    case Framing::kIncomplete:
      return false;
    case Framing::kOverflow:
      stats.overflow++;
      HandOff(c, std::string(in.substr(0, 256)), "overflow");
      c.in.clear();
      c.inStart = 0;
      return false;
    case Framing::kMalformed:
    case Framing::kBody:
      HandOff(c, std::string(in), f.kind == Framing::kMalformed ? "malformed" : "body");
      c.in.clear();
      c.inStart = 0;
      return false;
    case Framing::kRequest:
      break;
  }
  const http::Head& h = f.head;
  std::string_view head = in.substr(0, f.headBytes);
  std::string_view request = in.substr(0, f.headBytes + h.contentLength);
  c.inStart += request.size();
  c.partialSinceMs = 0;
  stats.requests++;
  bool hit = false;
  if (h.contentLength == 0) {
    if (c.slots.empty() && h.keepAlive) {
      // Next in line and the connection stays: the answer goes straight to the output.
      hit = TryAnswer(c, head, true, c.out);
    } else {
      std::string answer;
      hit = TryAnswer(c, head, h.keepAlive, answer);
      if (hit) c.slots.push_back(Slot{c.nextRequestId++, true, !h.keepAlive, std::move(answer)});
    }
  }
  if (hit) stats.hits++;
  else HandOff(c, std::string(request), "");
  // Nothing after a Connection: close request is read, as node does.
  if (!h.keepAlive) {
    c.noMoreRequests = true;
    c.in.clear();
    c.inStart = 0;
  }
  return true;
}

void Server::HandOff(Conn& c, std::string bytes, const std::string& error) {
  if (!error.empty()) {
    if (error == "malformed") stats.malformed++;
    c.noMoreRequests = true;
  }
  stats.handedToJs++;
  uint64_t rid = c.nextRequestId++;
  c.slots.push_back(Slot{rid, false, false, {}});
  auto* h = new Handoff{id, c.id, rid, std::move(bytes), c.remote, error};
  if (onRequest.NonBlockingCall(h, CallJs) != napi_ok) {
    delete h;
    // JS is gone: nobody will answer this request.
    c.slots.back().ready = true;
    c.slots.back().close = true;
  }
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

bool Server::TryAnswer(Conn& c, std::string_view head, bool keepAlive, std::string& out) {
  // ParseHitRequest depends on the head's bytes alone (and a per-server flag): an equal head asks the same.
  if (c.hitHead.empty() || head != c.hitHead) {
    c.hitHead.clear();
    if (!http::ParseHitRequest(head, metadataHeaderRequired, c.hitQuery)) return false;
    if (head.size() <= kMaxRememberedHead) c.hitHead.assign(head.data(), head.size());
  }
  // A swap that returned before this request was read is seen: the version is read after the read().
  RefreshTables();
  return http::AnswerFromTables(c.hitQuery, c.remote, keepAlive, firstOfSeveral, *routesNow_, *tokensNow_, NowMs(), out);
}

void Server::UpdateEvents(Conn& c) {
  uint32_t want = 0;
  if (!c.peerClosed && c.slots.size() < kMaxPendingPerConn && !c.closeAfterFlush) want |= EPOLLIN;
  if (c.outOffset < c.out.size()) want |= EPOLLOUT;
  if (want == c.events) return;
  c.events = want;
  epoll_event ev{};
  ev.events = want;
  ev.data.u64 = c.id;
  epoll_ctl(epollFd, EPOLL_CTL_MOD, c.fd, &ev);
}

void Server::Destroy(uint64_t id) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  epoll_ctl(epollFd, EPOLL_CTL_DEL, it->second->fd, nullptr);
  close(it->second->fd);
  conns_.erase(it);
}

void Server::DrainResponses() {
  std::vector<Response> batch;
  {
    std::lock_guard<std::mutex> lock(queueMutex);
    batch.swap(responses);
  }
  std::unordered_set<uint64_t> touched;
  for (auto& r : batch) {
    auto it = conns_.find(r.connId);
    if (it == conns_.end()) continue;  // the client went away meanwhile
    for (auto& s : it->second->slots) {
      if (s.requestId != r.requestId || s.ready) continue;
      s.ready = true;
      s.close = r.close;
      s.bytes = std::move(r.bytes);
      touched.insert(r.connId);
      break;
    }
  }
  for (auto id : touched) {
    auto it = conns_.find(id);
    if (it != conns_.end()) Pump(*it->second);
  }
}

void Server::CheckTimers() {
  int64_t now = MonoMs();
  std::vector<uint64_t> idle;
  for (auto& [id, c] : conns_) {
    if (c->partialSinceMs != 0 && now - c->partialSinceMs > headerTimeoutMs && !c->noMoreRequests) {
      stats.timeout++;
      c->partialSinceMs = 0;
      c->in.clear();
      HandOff(*c, {}, "timeout");
      continue;
    }
    if (c->slots.empty() && c->in.empty() && c->out.empty() && now - c->idleSinceMs > kKeepAliveMs) idle.push_back(id);
  }
  for (auto id : idle) Destroy(id);
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
    "serverStart({fd, maxConnections, maxHeaderBytes, headerTimeoutMs, metadataHeaderRequired, firstOfSeveral, peerMapFd?}, onRequest)";

Napi::Value ServerStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[0].IsObject() || !info[1].IsFunction()) return Usage(env, kStartUsage);
  Napi::Object o = info[0].As<Napi::Object>();
  for (const char* k : {"fd", "maxConnections", "maxHeaderBytes", "headerTimeoutMs"})
    if (!o.Get(k).IsNumber()) return Usage(env, kStartUsage);
  if (!o.Get("metadataHeaderRequired").IsBoolean() || !o.Get("firstOfSeveral").IsBoolean())
    return Usage(env, kStartUsage);

  auto s = std::make_shared<Server>();
  s->maxConnections = o.Get("maxConnections").As<Napi::Number>().Uint32Value();
  s->maxHeaderBytes = o.Get("maxHeaderBytes").As<Napi::Number>().Uint32Value();
  s->headerTimeoutMs = o.Get("headerTimeoutMs").As<Napi::Number>().Int64Value();
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

  s->onRequest = Napi::ThreadSafeFunction::New(env, info[1].As<Napi::Function>(), "nmi-native-server", 0, 1);
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
  put("requests", s->stats.requests);
  put("hits", s->stats.hits);
  put("handedToJs", s->stats.handedToJs);
  put("malformed", s->stats.malformed);
  put("overflow", s->stats.overflow);
  put("timeout", s->stats.timeout);
  put("refusedConnections", s->stats.refusedConnections);
  return o;
}

}  // namespace nmi
