// Listening sockets nmi makes itself, and the ones it is handed (systemd's
// LISTEN_FDS, a predecessor's), so a listener can outlive the process that made
// it. Which descriptor is for what is decided in src/lifecycle/listeners.ts.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <string>
#include <vector>

#include "addon.h"

namespace nmi {

// listenTcp(host, port, backlog): a bound, listening, non-blocking, close-on-exec TCP socket.
Napi::Value ListenTcp(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 3 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber()) {
    Napi::TypeError::New(env, "Usage: listenTcp(host: string, port: number, backlog: number)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string host = info[0].As<Napi::String>();
  int port = info[1].As<Napi::Number>().Int32Value();
  sockaddr_storage addr{};
  socklen_t len;
  auto* a4 = reinterpret_cast<sockaddr_in*>(&addr);
  auto* a6 = reinterpret_cast<sockaddr_in6*>(&addr);
  if (inet_pton(AF_INET, host.c_str(), &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    a4->sin_port = htons(static_cast<uint16_t>(port));
    len = sizeof *a4;
  } else if (inet_pton(AF_INET6, host.c_str(), &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons(static_cast<uint16_t>(port));
    len = sizeof *a6;
  } else {
    Napi::TypeError::New(env, "listenTcp: host must be an IP address").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return ThrowError(env, "socket", errno);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), len) < 0 || listen(fd, info[2].As<Napi::Number>().Int32Value()) < 0) {
    int err = errno;
    close(fd);
    return ThrowError(env, "listen " + host + ":" + std::to_string(port), err);
  }
  return Napi::Number::New(env, fd);
}

// listenUnix(path, mode): a listening, non-blocking, close-on-exec unix stream
// socket at path, never more open than mode while it is created (umask). node
// never binds it, so node never unlinks it when a server on it closes: the
// socket and its path outlive the process that made them.
Napi::Value ListenUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 3 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber()) {
    Napi::TypeError::New(env, "Usage: listenUnix(path: string, mode: number, backlog: number)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string path = info[0].As<Napi::String>();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) return ThrowError(env, "listen " + path, ENAMETOOLONG);
  memcpy(addr.sun_path, path.data(), path.size());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return ThrowError(env, "socket", errno);
  mode_t previous = umask(0777 & ~static_cast<mode_t>(info[1].As<Napi::Number>().Uint32Value()));
  int bound = bind(fd, reinterpret_cast<sockaddr*>(&addr), static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size()));
  int err = errno;
  umask(previous);
  if (bound < 0 || listen(fd, info[2].As<Napi::Number>().Int32Value()) < 0) {
    if (bound == 0) err = errno;
    close(fd);
    return ThrowError(env, "listen " + path, err);
  }
  return Napi::Number::New(env, fd);
}

// listeningAddress(fd): {host, port} of a listening TCP socket, {path} of a
// listening unix one, or null for anything else (another kind of descriptor, a
// socket not listening, a closed fd). Marks the descriptor close-on-exec:
// inherited ones are not, and nmi's children (iptables, nft) must not hold them.
Napi::Value ListeningAddress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!OneNumberArg(info, "listeningAddress(fd: number)", &fd)) return env.Undefined();
  int flags = fcntl(fd, F_GETFD);
  if (flags < 0) return env.Null();
  fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
  int type = 0, accepting = 0;
  socklen_t optlen = sizeof type;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &optlen) < 0 || type != SOCK_STREAM) return env.Null();
  optlen = sizeof accepting;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &optlen) < 0 || !accepting) return env.Null();
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) < 0) return env.Null();
  char text[INET6_ADDRSTRLEN] = {0};
  int port;
  if (addr.ss_family == AF_INET) {
    auto* a4 = reinterpret_cast<sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &a4->sin_addr, text, sizeof text);
    port = ntohs(a4->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    auto* a6 = reinterpret_cast<sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &a6->sin6_addr, text, sizeof text);
    port = ntohs(a6->sin6_port);
  } else if (addr.ss_family == AF_UNIX) {
    auto* un = reinterpret_cast<sockaddr_un*>(&addr);
    size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
    std::string path(un->sun_path, strnlen(un->sun_path, n));
    Napi::Object result = Napi::Object::New(env);
    result.Set("path", Napi::String::New(env, path));
    return result;
  } else {
    return env.Null();
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("host", Napi::String::New(env, text));
  result.Set("port", Napi::Number::New(env, port));
  return result;
}

// dupFd(fd): another close-on-exec descriptor of the same socket, for a server
// to own and close while the listener itself stays open.
Napi::Value DupFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int original;
  if (!OneNumberArg(info, "dupFd(fd: number)", &original)) return env.Undefined();
  int fd = fcntl(original, F_DUPFD_CLOEXEC, 3);
  if (fd < 0) return ThrowError(env, "dup", errno);
  return Napi::Number::New(env, fd);
}

// closeFd(fd): for descriptors handed over that nmi has no use for.
Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!OneNumberArg(info, "closeFd(fd: number)", &fd)) return env.Undefined();
  close(fd);
  return env.Undefined();
}

bool OneNumberArg(const Napi::CallbackInfo& info, const char* usage, int32_t* out) {
  if (info.Length() != 1 || !info[0].IsNumber()) {
    ThrowUsage(info.Env(), usage);
    return false;
  }
  *out = info[0].As<Napi::Number>().Int32Value();
  return true;
}

// FdArray(value, max, what, out): a JS array of at most max descriptor numbers;
// false, with a TypeError pending, when it is not one.
bool FdArray(Napi::Env env, const Napi::Value& value, size_t max, const char* what, std::vector<int>* out) {
  if (!value.IsArray()) {
    Napi::TypeError::New(env, std::string(what) + ": fds must be an array of numbers").ThrowAsJavaScriptException();
    return false;
  }
  Napi::Array list = value.As<Napi::Array>();
  if (list.Length() > max) {
    Napi::TypeError::New(env, std::string(what) + ": at most " + std::to_string(max) + " descriptors in one message").ThrowAsJavaScriptException();
    return false;
  }
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value v = list.Get(i);
    if (!v.IsNumber()) {
      Napi::TypeError::New(env, std::string(what) + ": fds must be an array of numbers").ThrowAsJavaScriptException();
      return false;
    }
    out->push_back(v.As<Napi::Number>().Int32Value());
  }
  return true;
}

// SendWithFds: one message on a unix socket (to `to`, or connected when null),
// fds along as SCM_RIGHTS; the errno of a failure, 0 when all of it was sent.
int SendWithFds(int sock, const sockaddr_un* to, socklen_t toLen, const std::string& message, const std::vector<int>& fds) {
  iovec iov{const_cast<char*>(message.data()), message.size()};
  msghdr msg{};
  msg.msg_name = const_cast<sockaddr_un*>(to);
  msg.msg_namelen = to ? toLen : 0;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t sent;
  do {
    sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) return errno;
  return static_cast<size_t>(sent) == message.size() ? 0 : EMSGSIZE;
}

// sendFds(socketFd, message, fds): one message with descriptors (SCM_RIGHTS) on
// a connected unix stream socket, for a successor taking nmi's listeners over;
// null on success, else the errno text.
Napi::Value SendFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 3 || !info[0].IsNumber() || !info[1].IsString()) {
    Napi::TypeError::New(env, "Usage: sendFds(socketFd: number, message: string, fds: number[])").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::vector<int> fds;
  // receiveFds makes room for 16.
  if (!FdArray(env, info[2], 16, "sendFds", &fds)) return env.Undefined();
  int err = SendWithFds(info[0].As<Napi::Number>().Int32Value(), nullptr, 0, info[1].As<Napi::String>(), fds);
  if (err) return ThrowError(env, "", err);
  return env.Null();
}

// receiveFds(path, timeoutMs): connects to a running nmi's handoff socket and
// reads its first message with the descriptors that come with it:
// {fd (the connection), message, fds}; null when nothing listens at path.
Napi::Value ReceiveFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[0].IsString() || !info[1].IsNumber()) {
    Napi::TypeError::New(env, "Usage: receiveFds(path: string, timeoutMs: number)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string path = info[0].As<Napi::String>();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) return ThrowError(env, "receiveFds: path", ENAMETOOLONG);
  memcpy(addr.sun_path, path.data(), path.size());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ThrowError(env, "socket", errno);
  int64_t ms = info[1].As<Napi::Number>().Int64Value();
  timeval tv{static_cast<time_t>(ms / 1000), static_cast<suseconds_t>((ms % 1000) * 1000)};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size())) < 0) {
    int err = errno;
    close(fd);
    if (err == ENOENT || err == ECONNREFUSED) return env.Null();
    return ThrowError(env, "connect " + path, err);
  }
  char buf[4096];
  iovec iov{buf, sizeof buf};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * 16), 0);
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  ssize_t got;
  do {
    got = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  } while (got < 0 && errno == EINTR);
  if (got <= 0) {
    int err = got < 0 ? errno : ECONNRESET;
    close(fd);
    return ThrowError(env, "receive from " + path, err);
  }
  Napi::Array fds = Napi::Array::New(env);
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < n; i++) {
      int received;
      memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      fds.Set(fds.Length(), Napi::Number::New(env, received));
    }
  }
  // The rest of the conversation is node's (a net.Socket on this fd): no timeouts there.
  timeval none{0, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
  Napi::Object result = Napi::Object::New(env);
  result.Set("fd", Napi::Number::New(env, fd));
  result.Set("message", Napi::String::New(env, std::string(buf, static_cast<size_t>(got))));
  result.Set("fds", fds);
  return result;
}

// peerCredentials(socketFd): {uid, pid} of the process at the other end of a unix socket (SO_PEERCRED); null when unknown.
Napi::Value PeerCredentials(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!OneNumberArg(info, "peerCredentials(socketFd: number)", &fd)) return env.Undefined();
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return env.Null();
  Napi::Object result = Napi::Object::New(env);
  result.Set("uid", Napi::Number::New(env, cred.uid));
  result.Set("pid", Napi::Number::New(env, cred.pid));
  return result;
}

}  // namespace nmi
