// libFuzzer target for one connection's state machine (native/connection.cc),
// driven as server.cc drives it, by a peer and a JavaScript side the input
// scripts: the peer sends in pieces (pipelined requests, bodies, garbage),
// reads some of the answers or none, closes; JavaScript answers requests in
// any order, or the server refuses them (busy); time passes. After every step
// the bounds hold, answers leave whole and in request order, and at the end a
// peer that reads everything sees the connection idle or closed: it never sticks.
// Built and run by scripts/fuzz.sh.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../../native/connection.h"
#include "check.h"

using nmi::conn::Connection;
using nmi::conn::Host;
using nmi::conn::Limits;

namespace {

// Small bounds, so the fuzzer reaches every one of them often.
Limits SmallLimits() {
  Limits l;
  l.maxHeaderBytes = 256;
  l.maxBodyBytes = 16 * 1024;  // as src/config/limits.ts's maxBodyBytes
  l.maxPending = 4;
  l.maxUnsentBytes = 512;
  l.maxDeferredBytes = 600;
  l.headerTimeoutMs = 1000;
  l.writeTimeoutMs = 2000;
  l.keepAliveMs = 500;
  l.lingerMs = 300;
  l.maxLingerBytes = 1024;
  return l;
}

constexpr size_t kMaxAnswer = 300;  // the largest answer either side writes here
constexpr size_t kMaxRead = 255;    // one read: a count byte

// Every answer is "<kind><sequence>;" padded with '.': the output must be whole answers in order.
std::string Marked(char kind, uint64_t seq, size_t size) {
  std::string s = kind + std::to_string(seq) + ";";
  if (s.size() < size) s.append(size - s.size(), '.');
  return s;
}

class FakeHost : public Host {
 public:
  struct Waiting {
    uint64_t requestId;
    uint64_t seq;
  };
  std::vector<Waiting> waiting;  // deferred, not answered yet
  uint64_t seq = 0;              // requests in the order the connection took them
  size_t capacity = 3;           // how many JavaScript may hold before the server says busy
  uint64_t busy = 0;

  bool TryAnswer(Connection&, std::string_view head, bool, std::string& out) override {
    seq++;
    if (head.rfind("GET /h", 0) != 0) return false;
    out += Marked('H', seq, 40);
    return true;
  }
  bool Defer(Connection&, uint64_t requestId, std::string bytes, std::string_view error) override {
    // A request TryAnswer did not see (a body, or no request at all) takes its place in line here.
    if (!bytes.empty() ? bytes.find("\r\n\r\n") + 4 != bytes.size() : true) seq++;
    if (waiting.size() >= capacity) {
      busyFor = seq;
      return false;
    }
    CHECK(error.empty() == !bytes.empty());
    waiting.push_back({requestId, seq});
    return true;
  }
  void AppendBusy(bool, std::string& out) override {
    busy++;
    out += Marked('B', busyFor, 30);
  }

 private:
  uint64_t busyFor = 0;
};

class Reader {
 public:
  std::string data;
  size_t at = 0;
  bool More() const { return at < data.size(); }
  uint8_t Byte() { return More() ? static_cast<uint8_t>(data[at++]) : 0; }
  std::string Bytes(size_t n) {
    n = std::min(n, data.size() - at);
    std::string s = data.substr(at, n);
    at += n;
    return s;
  }
};

// A timer the owner closes the connection on.
bool Ends(Connection::Timer t) { return t == Connection::Timer::kClose || t == Connection::Timer::kWriteTimeout; }

// The answers the peer read must be whole and their sequence numbers rising.
void CheckOutput(const std::string& taken) {
  uint64_t last = 0;
  size_t at = 0;
  while (at < taken.size()) {
    char kind = taken[at];
    CHECK(kind == 'H' || kind == 'J' || kind == 'B' || kind == 'R');
    size_t semi = taken.find(';', at);
    if (semi == std::string::npos) return;  // the rest of an answer is still to come
    uint64_t seq = std::strtoull(taken.substr(at + 1, semi - at - 1).c_str(), nullptr, 10);
    if (kind != 'R') {
      CHECK(seq > last);
      last = seq;
    }
    at = taken.find_first_not_of('.', semi + 1);
    if (at == std::string::npos) return;
  }
}

void Run(Reader& in) {
  static const Limits limits = SmallLimits();
  FakeHost host;
  int64_t now = 1000;
  Connection c(2, "10.0.0.1", limits, now);
  bool closed = false;
  std::string taken;  // what the peer read
  size_t largestInput = 0;
  if (in.Byte() % 16 == 0) c.Refuse(Marked('R', 0, 60), now);
  auto step = [&] {
    c.Pump(host, now);
    if (c.ShouldShutdown()) c.StartLinger(now);
    CHECK(c.Pending() <= limits.maxPending);
    CHECK(c.BufferedInput() <= limits.maxHeaderBytes + limits.maxBodyBytes + kMaxRead);
    CHECK(c.DeferredBytes() <= limits.maxDeferredBytes + limits.maxHeaderBytes + limits.maxBodyBytes);
    // Output grows past its bound by what was already answered when the bound was reached, never more.
    CHECK(c.UnsentBytes() <= limits.maxUnsentBytes + (limits.maxPending + 1) * kMaxAnswer);
    largestInput = std::max(largestInput, c.BufferedInput());
    if (c.Finished(false)) closed = true;
  };
  while (in.More() && !closed) {
    uint8_t op = in.Byte();
    switch (op % 6) {
      case 0:
      case 1: {  // the peer sends; the server reads only when the connection wants it
        std::string bytes = in.Bytes(in.Byte());
        if (c.WantsRead()) c.Received(bytes);
        break;
      }
      case 2: {  // the peer reads
        size_t n = std::min<size_t>(c.UnsentBytes(), in.Byte());
        taken.append(c.Unsent().substr(0, n));
        c.Sent(n, now);
        break;
      }
      case 3: {  // JavaScript answers one waiting request, in any order
        if (host.waiting.empty()) break;
        size_t i = in.Byte() % host.waiting.size();
        auto w = host.waiting[i];
        host.waiting.erase(host.waiting.begin() + static_cast<long>(i));
        uint8_t shape = in.Byte();
        c.Answer(w.requestId, Marked('J', w.seq, 20 + shape % (kMaxAnswer - 20)), shape % 7 == 0);
        break;
      }
      case 4:  // time passes
        now += in.Byte() * 20;
        if (Ends(c.CheckTimers(host, now))) closed = true;
        break;
      case 5:
        if (in.Byte() % 8 == 0) c.PeerClosed();
        host.capacity = in.Byte() % 5;
        break;
    }
    if (!closed) step();
    CheckOutput(taken);
  }
  if (closed) return;
  // The peer reads everything, JavaScript answers everything, time passes: the connection ends or idles.
  host.capacity = 1000;
  for (int round = 0; round < 200 && !closed; round++) {
    for (auto& w : host.waiting) c.Answer(w.requestId, Marked('J', w.seq, 30), false);
    host.waiting.clear();
    step();
    taken.append(c.Unsent());
    c.Sent(c.UnsentBytes(), now);
    step();
    CheckOutput(taken);
    if (closed) return;
    now += 100;
    if (Ends(c.CheckTimers(host, now))) return;
  }
  CHECK(closed);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in{std::string(reinterpret_cast<const char*>(data), size)};
  Run(in);
  return 0;
}
