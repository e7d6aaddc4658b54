// The native token server's loop (server.h): its sockets, its epoll thread
// and the server-wide bounds.
#include "server.h"

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

#include <iterator>
#include <unordered_set>

#include "http-parse.h"

namespace nmi {
namespace server {

using imds::CallerTable;
using imds::TokenTable;

// A connection and its socket.
struct Socket : conn::Connection {
  Socket(int fd, uint64_t id, std::string remote, const conn::Limits& limits, int64_t nowMs)
      : conn::Connection(id, std::move(remote), limits, nowMs), fd(fd) {}
  int fd;
  uint32_t events = 0;
  // The head of this connection's last hit and what it asked: a pod polls with identical heads.
  std::string hitHead;
  imds::HitQuery hitQuery;
};

namespace {

constexpr int64_t kAcceptRetryMs = 100;  // accept4 out of descriptors or memory: the backlog waits this long

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

}  // namespace

Server::Server() = default;

Server::~Server() {
  // process.exit() skips environment cleanup hooks: the last reference goes
  // with the static table, and a joinable std::thread would abort the exit.
  hardStop_ = true;
  if (wakeFd_ >= 0) Wake();
  Join();
  if (epollFd_ >= 0) close(epollFd_);
  if (wakeFd_ >= 0) close(wakeFd_);
  if (listenFd_ >= 0) close(listenFd_);
  if (peerMapFd >= 0) close(peerMapFd);
}

std::string Server::Open(int fd) {
  listenFd_ = fd;
  int flags = fcntl(listenFd_, F_GETFL);
  if (flags < 0 || fcntl(listenFd_, F_SETFL, flags | O_NONBLOCK) < 0) return std::string("fd: ") + strerror(errno);
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  auto* a4 = reinterpret_cast<sockaddr_in*>(&addr);
  auto* a6 = reinterpret_cast<sockaddr_in6*>(&addr);
  getsockname(listenFd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.ss_family == AF_INET ? a4->sin_port : a6->sin6_port);
  wakeFd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epollFd_ = epoll_create1(EPOLL_CLOEXEC);
  if (wakeFd_ < 0 || epollFd_ < 0) return std::string("epoll: ") + strerror(errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  epoll_ctl(epollFd_, EPOLL_CTL_ADD, listenFd_, &ev);
  ev.data.u64 = 1;
  epoll_ctl(epollFd_, EPOLL_CTL_ADD, wakeFd_, &ev);
  return "";
}

void Server::Start() {
  thread_ = std::thread([this] { Run(); });
}

bool Server::Stop(int64_t drainMs) {
  if (stopping_.load()) return false;
  drainDeadlineMs_ = MonoMs() + drainMs;
  stopping_ = true;
  Wake();
  return true;
}

void Server::StopNow() {
  hardStop_ = true;
  Wake();
  Join();
}

void Server::Join() {
  std::lock_guard<std::mutex> lock(joinMutex_);
  if (thread_.joinable()) thread_.join();
}

void Server::Wake() {
  uint64_t one = 1;
  ssize_t n = write(wakeFd_, &one, sizeof one);
  (void)n;
}

void Server::Respond(Response r) {
  {
    std::lock_guard<std::mutex> lock(queueMutex_);
    responses_.push_back(std::move(r));
  }
  Wake();
}

void Server::SetCallers(std::shared_ptr<const CallerTable> callers) {
  std::lock_guard<std::mutex> lock(tablesMutex_);
  callers_ = std::move(callers);
  tablesVersion_.fetch_add(1, std::memory_order_release);
}

// Only what changed crosses from JS; the copy made here shares every unchanged entry with the table it replaces.
void Server::UpdateTokens(std::vector<std::pair<std::string, std::shared_ptr<const imds::TokenEntry>>> upserts,
                          const std::vector<std::string>& removals) {
  std::shared_ptr<const TokenTable> current;
  {
    std::lock_guard<std::mutex> lock(tablesMutex_);
    current = tokens_;
  }
  // Only the JS thread writes the table, so nothing changes it between the read above and the swap below.
  auto table = std::make_shared<TokenTable>(*current);
  auto retire = [&](const std::string& key) {
    auto it = table->find(key);
    if (it != table->end() && countHits) retired_.emplace_back(key, it->second);
  };
  for (auto& key : removals) {
    retire(key);
    table->erase(key);
  }
  for (auto& [key, entry] : upserts) {
    retire(key);
    (*table)[key] = std::move(entry);
  }
  if (bodies_.size() > 2 * table->size() + 64) {
    for (auto it = bodies_.begin(); it != bodies_.end();) it = it->second.expired() ? bodies_.erase(it) : std::next(it);
  }
  std::lock_guard<std::mutex> lock(tablesMutex_);
  tokens_ = std::move(table);
  tablesVersion_.fetch_add(1, std::memory_order_release);
}

std::shared_ptr<const imds::TokenBody> Server::Body(std::string prefix, std::string suffix) {
  size_t hash = std::hash<std::string>{}(prefix) * 31 + std::hash<std::string>{}(suffix);
  auto [from, to] = bodies_.equal_range(hash);
  for (auto it = from; it != to; ++it) {
    auto held = it->second.lock();
    if (held && held->prefix == prefix && held->suffix == suffix) return held;
  }
  auto body = std::make_shared<const imds::TokenBody>(imds::TokenBody{std::move(prefix), std::move(suffix)});
  bodies_.emplace(hash, body);
  return body;
}

std::vector<std::pair<std::string, uint64_t>> Server::TakeHits() {
  std::shared_ptr<const TokenTable> current;
  {
    std::lock_guard<std::mutex> lock(tablesMutex_);
    current = tokens_;
  }
  std::vector<std::pair<std::string, uint64_t>> taken;
  auto take = [&](const std::string& key, const imds::TokenEntry& e) {
    uint64_t n = e.hits->exchange(0, std::memory_order_relaxed);
    if (n > 0) taken.emplace_back(key, n);
  };
  for (auto& [key, entry] : *current) take(key, *entry);
  for (auto& [key, entry] : retiredBefore_) take(key, *entry);
  for (auto& [key, entry] : retired_) take(key, *entry);
  retiredBefore_ = std::move(retired_);
  retired_.clear();
  return taken;
}

void Server::Run() {
  epoll_event evs[128];
  listening_ = true;
  while (!hardStop_.load()) {
    if (stopping_.load() && listening_) {
      if (!acceptPaused_) epoll_ctl(epollFd_, EPOLL_CTL_DEL, listenFd_, nullptr);
      close(listenFd_);
      listenFd_ = -1;
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
    if (!listening_ && (conns_.empty() || MonoMs() >= drainDeadlineMs_.load())) break;
    int n = epoll_wait(epollFd_, evs, 128, 100);
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
        ssize_t r = read(wakeFd_, &v, sizeof v);
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
  if (hardStop_.load()) return;  // the environment is going away: no JS left to tell
  auto* done = new Deferred{this->id, 0, 0, {}, {}, {}};
  if (onRequest.BlockingCall(done, CallJs) != napi_ok) delete done;
  onRequest.Release();
}

void Server::PauseAccept(bool paused) {
  if (paused == acceptPaused_ || !listening_) return;
  acceptPaused_ = paused;
  if (paused) {
    epoll_ctl(epollFd_, EPOLL_CTL_DEL, listenFd_, nullptr);
    return;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  epoll_ctl(epollFd_, EPOLL_CTL_ADD, listenFd_, &ev);
}

void Server::Accept() {
  while (conns_.size() < maxConnections) {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    int fd = accept4(listenFd_, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
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
    epoll_ctl(epollFd_, EPOLL_CTL_ADD, fd, &ev);
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
  if (s.Finished(stopping_.load())) {
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

bool Server::Defer(conn::Connection& c, uint64_t requestId, std::string bytes, std::string_view error) {
  size_t size = bytes.size();
  if (deferred_.size() >= maxDeferredRequests || deferredBytes_ + size > maxDeferredBytes) {
    stats.busy++;
    return false;
  }
  if (error == "malformed") stats.malformed++;
  else if (error == "overflow") stats.overflow++;
  else if (error == "timeout") stats.timeout++;
  auto* d = new Deferred{id, c.id, requestId, std::move(bytes), c.remote, std::string(error)};
  if (onRequest.NonBlockingCall(d, CallJs) != napi_ok) {
    // JS is gone or its queue is full: nobody will answer this request.
    delete d;
    stats.busy++;
    return false;
  }
  stats.deferredToJs++;
  deferred_[{c.id, requestId}] = size;
  deferredBytes_ += size;
  return true;
}

void Server::AppendFixed(const FixedAnswer& a, bool keepAlive, std::string& out) {
  out += a.head;
  http::AppendDateAndConnection(NowMs(), keepAlive, rules.keepAliveS, out);
  out += a.body;
}

void Server::RefreshTables() {
  uint64_t version = tablesVersion_.load(std::memory_order_acquire);
  if (version == seenTables_) return;
  std::lock_guard<std::mutex> lock(tablesMutex_);
  callersNow_ = callers_;
  tokensNow_ = tokens_;
  seenTables_ = version;
}

// Heads longer than this are parsed every time rather than kept per connection.
constexpr size_t kMaxRememberedHead = 1024;

bool Server::TryAnswer(conn::Connection& c, std::string_view head, bool keepAlive, std::string& out) {
  auto& s = static_cast<Socket&>(c);
  // ParseHitRequest depends on the head's bytes alone (and the server's rules): an equal head asks the same.
  if (s.hitHead.empty() || head != s.hitHead) {
    s.hitHead.clear();
    if (!imds::ParseHitRequest(head, rules, s.hitQuery)) return false;
    if (head.size() <= kMaxRememberedHead) s.hitHead.assign(head.data(), head.size());
  }
  // A swap that returned before this request was read is seen: the version is read after the read().
  RefreshTables();
  if (!imds::AnswerFromTables(s.hitQuery, s.remote, keepAlive, rules, *callersNow_, *tokensNow_, NowMs(), out))
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
  epoll_ctl(epollFd_, EPOLL_CTL_MOD, s.fd, &ev);
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
    std::lock_guard<std::mutex> lock(queueMutex_);
    batch.swap(responses_);
  }
  std::unordered_set<uint64_t> touched;
  for (auto& r : batch) {
    auto deferred = deferred_.find({r.connId, r.requestId});
    if (deferred != deferred_.end()) {
      deferredBytes_ -= deferred->second;
      deferred_.erase(deferred);
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

}  // namespace server
}  // namespace nmi
