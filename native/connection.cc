#include "connection.h"

#include <utility>

#include "http-parse.h"

namespace nmi {
namespace conn {

using http::Framing;

// An idle connection keeps buffers this large at most: one burst must not pin its peak for the connection's life.
constexpr size_t kKeptCapacity = 16 * 1024;

Connection::Connection(uint64_t id, std::string remote, const Limits& limits, int64_t nowMs)
    : id(id), remote(std::move(remote)), limits_(limits), idleSinceMs_(nowMs) {}

bool Connection::TakesRequests() const {
  return !noMoreRequests_ && !closeAfterFlush_ && slots_.size() < limits_.maxPending &&
         deferredBytes_ < limits_.maxDeferredBytes && UnsentBytes() < limits_.maxUnsentBytes;
}

bool Connection::WantsRead() const {
  if (peerClosed_) return false;
  // Dropped as read: bounded by maxLingerBytes and lingerMs.
  if (lingering_) return true;
  // One read past a full request is enough to frame it; more waits in the kernel.
  return TakesRequests() && in_.size() <= limits_.maxHeaderBytes + limits_.maxBodyBytes;
}

void Connection::Received(std::string_view bytes) {
  if (lingering_) {
    lingerBytes_ += bytes.size();
    return;
  }
  if (!noMoreRequests_) in_.append(bytes);
}

void Connection::Append(std::string_view bytes, int64_t nowMs) {
  if (!WantsWrite()) progressMs_ = nowMs;  // the write timer starts when output begins to wait
  out_.append(bytes);
}

void Connection::Sent(size_t n, int64_t nowMs) {
  if (n == 0) return;
  outOffset_ += n;
  progressMs_ = nowMs;
  if (outOffset_ == out_.size()) {
    out_.clear();
    outOffset_ = 0;
    if (out_.capacity() > kKeptCapacity) out_.shrink_to_fit();
    if (slots_.empty()) idleSinceMs_ = nowMs;
  }
}

void Connection::Refuse(std::string_view bytes, int64_t nowMs) {
  refused_ = true;
  noMoreRequests_ = true;
  closeAfterFlush_ = true;
  Append(bytes, nowMs);
}

void Connection::Answer(uint64_t requestId, std::string bytes, bool close) {
  for (auto& s : slots_) {
    if (s.requestId != requestId || s.ready) continue;
    s.ready = true;
    s.close = close;
    s.bytes = std::move(bytes);
    deferredBytes_ -= s.deferredBytes;
    s.deferredBytes = 0;
    return;
  }
}

void Connection::Pump(Host& host, int64_t nowMs) {
  for (int round = 0; round < 1000; round++) {
    while (TakesRequests() && ProcessOne(host, nowMs)) {
    }
    in_.erase(0, inStart_);
    inStart_ = 0;
    if (in_.empty() && in_.capacity() > kKeptCapacity) in_.shrink_to_fit();
    bool moved = false;
    while (!closeAfterFlush_ && !slots_.empty() && slots_.front().ready) {
      Slot& s = slots_.front();
      Append(s.bytes, nowMs);
      moved = true;
      if (s.close) {
        closeAfterFlush_ = true;
        noMoreRequests_ = true;
        slots_.clear();
        in_.clear();
        break;
      }
      slots_.pop_front();
    }
    if (!moved) break;
  }
}

// Takes one complete request off in_ (from inStart_, parsed in place); false when there is none (yet).
bool Connection::ProcessOne(Host& host, int64_t nowMs) {
  std::string_view in(in_);
  in.remove_prefix(inStart_);
  size_t skip = http::LeadingEmptyLines(in);
  inStart_ += skip;
  in.remove_prefix(skip);
  if (in.empty()) {
    partialSinceMs_ = 0;
    return false;
  }
  Framing f = http::FrameRequest(in, limits_.maxHeaderBytes, limits_.maxBodyBytes);
  const char* error = nullptr;
  switch (f.kind) {
    case Framing::kIncomplete:
      if (partialSinceMs_ == 0) partialSinceMs_ = nowMs;
      return false;
    case Framing::kOverflow:
      error = "overflow";
      break;
    case Framing::kMalformed:
      error = "malformed";
      break;
    case Framing::kBody:
      error = "body";
      break;
    case Framing::kBodyNotAllowed:
      error = "body-not-allowed";
      break;
    case Framing::kTooLarge:
      error = "too-large";
      break;
    case Framing::kRequest:
      break;
  }
  partialSinceMs_ = 0;
  if (error) {
    // JavaScript answers from the reason alone; the bytes stay here, and nothing after them is read.
    in_.clear();
    inStart_ = 0;
    Defer(host, {}, error, false);
    return false;
  }
  const http::Head& h = f.head;
  std::string_view head = in.substr(0, f.headBytes);
  std::string_view request = in.substr(0, f.headBytes + h.contentLength);
  inStart_ += request.size();
  bool hit = false;
  if (h.contentLength == 0) {
    if (slots_.empty() && h.keepAlive) {
      // Next in line and the connection stays: the answer goes straight to the output.
      bool waiting = WantsWrite();
      hit = host.TryAnswer(*this, head, true, out_);
      if (hit && !waiting) progressMs_ = nowMs;
    } else {
      std::string answer;
      hit = host.TryAnswer(*this, head, h.keepAlive, answer);
      if (hit) slots_.push_back(Slot{nextRequestId_++, true, !h.keepAlive, 0, std::move(answer)});
    }
  }
  if (!hit) Defer(host, std::string(request), {}, h.keepAlive);
  // Nothing after a Connection: close request is read, as node does.
  if (!h.keepAlive) {
    noMoreRequests_ = true;
    in_.clear();
    inStart_ = 0;
  }
  return true;
}

void Connection::Defer(Host& host, std::string bytes, std::string_view error, bool keepAlive) {
  if (!error.empty()) noMoreRequests_ = true;
  uint64_t rid = nextRequestId_++;
  size_t size = bytes.size();
  slots_.push_back(Slot{rid, false, false, size, {}});
  deferredBytes_ += size;
  if (host.Defer(*this, rid, std::move(bytes), error)) return;
  // Refused: answered here. A request that could not be framed still ends the connection.
  Slot& s = slots_.back();
  deferredBytes_ -= size;
  s.deferredBytes = 0;
  s.ready = true;
  s.close = !keepAlive || !error.empty();
  host.AppendBusy(!s.close, s.bytes);
}

void Connection::StartLinger(int64_t nowMs) {
  lingering_ = true;
  lingerSinceMs_ = nowMs;
  in_.clear();
  inStart_ = 0;
}

bool Connection::Finished(bool stopping) const {
  if (WantsWrite()) return false;
  if (lingering_) return peerClosed_;
  if (!slots_.empty()) return false;
  if (peerClosed_) return true;
  // Stopping: a connection goes once nothing of it is left to answer.
  return stopping && (noMoreRequests_ || in_.empty());
}

Connection::Timer Connection::CheckTimers(Host& host, int64_t nowMs) {
  if (lingering_) {
    bool over = nowMs - lingerSinceMs_ > limits_.lingerMs || lingerBytes_ > limits_.maxLingerBytes;
    return over ? Timer::kClose : Timer::kNone;
  }
  if (WantsWrite() && nowMs - progressMs_ > limits_.writeTimeoutMs) return Timer::kWriteTimeout;
  if (partialSinceMs_ != 0 && nowMs - partialSinceMs_ > limits_.headerTimeoutMs && !noMoreRequests_) {
    partialSinceMs_ = 0;
    in_.clear();
    inStart_ = 0;
    Defer(host, {}, "timeout", false);
    return Timer::kHeaderTimeout;
  }
  if (Empty() && !closeAfterFlush_ && nowMs - idleSinceMs_ > limits_.keepAliveMs) return Timer::kClose;
  return Timer::kNone;
}

}  // namespace conn
}  // namespace nmi
