// sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET. Node's dgram
// module has no AF_UNIX support, hence the addon.
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <string>
#include <vector>

#include "addon.h"

namespace nmi {

// sdNotify(socketPath, message, fds?): null on success, else the errno text.
// A path starting with '@' names an abstract socket. fds go along as
// SCM_RIGHTS, as sd_pid_notify_with_fds(3) sends them (FDSTORE=1).
Napi::Value SdNotify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool withFds = info.Length() == 3 && info[2].IsArray();
  if ((info.Length() != 2 && !withFds) || !info[0].IsString() || !info[1].IsString()) {
    Napi::TypeError::New(env, "Usage: sdNotify(socketPath: string, message: string, fds?: number[])").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::vector<int> fds;
  if (withFds) {
    Napi::Array list = info[2].As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value v = list.Get(i);
      if (!v.IsNumber()) {
        Napi::TypeError::New(env, "sdNotify: fds must be numbers").ThrowAsJavaScriptException();
        return env.Undefined();
      }
      fds.push_back(v.As<Napi::Number>().Int32Value());
    }
    if (fds.size() > 253) return Napi::String::New(env, "too many descriptors for one message");
  }
  std::string path = info[0].As<Napi::String>();
  std::string message = info[1].As<Napi::String>();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Napi::String::New(env, "socket path empty or too long");
  }
  memcpy(addr.sun_path, path.data(), path.size());
  if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0';
  socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());

  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Napi::String::New(env, strerror(errno));
  iovec iov{const_cast<char*>(message.data()), message.size()};
  msghdr msg{};
  msg.msg_name = &addr;
  msg.msg_namelen = len;
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
  ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
  int saved = errno;
  close(fd);
  if (sent < 0) return Napi::String::New(env, strerror(saved));
  return env.Null();
}

}  // namespace nmi
