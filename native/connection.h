// One connection of the native token server as a state machine, with no
// sockets, threads or Node: bytes in, answers out in request order, and every
// bound a caller can push against decided here (requests waiting, unsent
// output, bytes waiting on JavaScript, the header, write and keep-alive
// timers, the lingering close). server.cc owns the socket and calls these;
// test/fuzz/connection_fuzzer.cc drives the same code with a peer that sends in
// pieces, stops reading, pipelines and sends bodies.
#pragma once
#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <string_view>

namespace nmi {
namespace conn {

// The bounds without a value here come from TypeScript at start (src/config/limits.ts); the others are this
// state machine's own.
struct Limits {
  size_t maxHeaderBytes = 0;
  size_t maxBodyBytes = 0;              // a longer declared body is deferred as "too-large", unread
  size_t maxPending = 32;               // pipelined requests awaiting an answer
  size_t maxUnsentBytes = 0;            // answers the peer has not taken; above it no request is read
  size_t maxDeferredBytes = 0;          // request bytes waiting on JavaScript; above it no request is read
  int64_t headerTimeoutMs = 0;          // a request partly received for this long is answered 408
  int64_t writeTimeoutMs = 0;           // unsent output that makes no progress for this long closes the connection
  int64_t keepAliveMs = 0;              // an idle keep-alive connection, as node's js server
  int64_t lingerMs = 1000;              // after the last answer: the peer's FIN awaited this long, so a close is no reset
  size_t maxLingerBytes = 64 * 1024;    // what a lingering peer may still send before it is cut off
};

class Connection;

// What a connection needs of its server: server.cc implements it, the fuzzer stands in for it.
class Host {
 public:
  virtual ~Host() = default;
  // The cache hit for a bodiless request, appended to out; false when JavaScript must judge it.
  virtual bool TryAnswer(Connection& c, std::string_view head, bool keepAlive, std::string& out) = 0;
  // Defers a request (or, with error set, the reason it cannot be one) to JavaScript, which answers through
  // Connection::Answer. False when the server holds as many as it may: the connection then answers 503 itself.
  virtual bool Defer(Connection& c, uint64_t requestId, std::string bytes, std::string_view error) = 0;
  // The 503 written when Defer says no.
  virtual void AppendBusy(bool keepAlive, std::string& out) = 0;
};

class Connection {
 public:
  Connection(uint64_t id, std::string remote, const Limits& limits, int64_t nowMs);

  const uint64_t id;
  const std::string remote;  // the caller's key in the caller table ("address", or "address#cgroup")

  // Bytes the peer sent.
  void Received(std::string_view bytes);
  // The peer will send nothing more (EOF).
  void PeerClosed() { peerClosed_ = true; }
  // JavaScript's answer to requestId; ignored when that request is no longer waiting.
  void Answer(uint64_t requestId, std::string bytes, bool close);
  // A whole answer written at once, before any request is read, after which the connection closes
  // (the caller holds too many connections already).
  void Refuse(std::string_view bytes, int64_t nowMs);
  // Frames what arrived, answers hits, defers the rest, and moves answers next in line to the output.
  void Pump(Host& host, int64_t nowMs);

  // What to write next, and how much of it the peer took.
  std::string_view Unsent() const { return std::string_view(out_).substr(outOffset_); }
  void Sent(size_t n, int64_t nowMs);

  // Whether to read the socket: not while the peer leaves answers unread, too many requests or bytes wait,
  // or no further request will be taken (bytes a lingering close still reads are dropped).
  bool WantsRead() const;
  bool WantsWrite() const { return outOffset_ < out_.size(); }
  // The last answer is out: the owner shuts its side down (FIN) once and waits for the peer's (Lingering).
  bool ShouldShutdown() const { return closeAfterFlush_ && !WantsWrite() && !lingering_; }
  // Answered before it asked (Refuse): its request may still be on the way, so only a lingering close is safe.
  bool Refused() const { return refused_; }
  void StartLinger(int64_t nowMs);
  // Nothing is left to do: the owner closes it. stopping: the server is draining, so keep-alive ends.
  bool Finished(bool stopping) const;
  // Answered once and holds nothing: a draining server closes it at once.
  bool IdleKeepAlive() const { return nextRequestId_ > 1 && Empty(); }

  // kHeaderTimeout: a partial request was deferred as "timeout", the owner serves the connection;
  // kWriteTimeout: its output has not moved; kClose: idle, or done lingering. The owner closes it on either.
  enum class Timer { kNone, kHeaderTimeout, kWriteTimeout, kClose };
  Timer CheckTimers(Host& host, int64_t nowMs);

  // For the fuzzer's invariants and the server's counters.
  size_t Pending() const { return slots_.size(); }
  size_t BufferedInput() const { return in_.size(); }
  size_t DeferredBytes() const { return deferredBytes_; }
  size_t UnsentBytes() const { return out_.size() - outOffset_; }
  bool TakesRequests() const;

 private:
  struct Slot {
    uint64_t requestId;
    bool ready = false;
    bool close = false;
    size_t deferredBytes = 0;
    std::string bytes;
  };

  const Limits& limits_;
  std::string in_;
  size_t inStart_ = 0;  // bytes of in_ already taken, dropped once per Pump (always 0 outside it)
  std::string out_;
  size_t outOffset_ = 0;
  std::deque<Slot> slots_;
  uint64_t nextRequestId_ = 1;
  size_t deferredBytes_ = 0;
  bool noMoreRequests_ = false;  // a Connection: close request, an error, or a refusal was seen
  bool closeAfterFlush_ = false;
  bool peerClosed_ = false;
  bool lingering_ = false;
  bool refused_ = false;
  size_t lingerBytes_ = 0;
  int64_t partialSinceMs_ = 0;  // 0 when no request is partly received
  int64_t idleSinceMs_;
  int64_t progressMs_ = 0;      // when the output last moved (or began to wait)
  int64_t lingerSinceMs_ = 0;

  bool Empty() const { return slots_.empty() && out_.size() == outOffset_ && in_.size() == inStart_; }
  bool ProcessOne(Host& host, int64_t nowMs);
  void Defer(Host& host, std::string bytes, std::string_view error, bool keepAlive);
  void Append(std::string_view bytes, int64_t nowMs);
};

}  // namespace conn
}  // namespace nmi
