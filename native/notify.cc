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

// sdNotify(socketPath, message, fds?): throws with the errno when the datagram cannot be sent.
// A path starting with '@' names an abstract socket. fds go along as
// SCM_RIGHTS, as sd_pid_notify_with_fds(3) sends them (FDSTORE=1).
Napi::Value SdNotify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if ((info.Length() != 2 && info.Length() != 3) || !info[0].IsString() || !info[1].IsString()) {
    Napi::TypeError::New(env, "Usage: sdNotify(socketPath: string, message: string, fds?: number[])").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::vector<int> fds;
  // 253: SCM_MAX_FD, what the kernel takes in one message.
  if (info.Length() == 3 && !FdArray(env, info[2], 253, "sdNotify", &fds)) return env.Undefined();
  std::string path = info[0].As<Napi::String>();
  std::string message = info[1].As<Napi::String>();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return ThrowError(env, "socket path empty or too long");
  }
  memcpy(addr.sun_path, path.data(), path.size());
  if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0';
  socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());

  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ThrowError(env, "", errno);
  int saved = SendWithFds(fd, &addr, len, message, fds);
  close(fd);
  if (saved) return ThrowError(env, "", saved);
  return env.Undefined();
}

}  // namespace nmi
