// setns(2) for the calling thread. `nmi demo` and the tests move the main
// thread into their throwaway "node" namespace so the stand-ins they serve
// from listen there; libuv creates sockets on the main thread.
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include <string>

#include "addon.h"

namespace nmi {

// setNetns(path): throws with the errno when the namespace cannot be entered.
Napi::Value SetNetns(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 1 || !info[0].IsString()) {
    Napi::TypeError::New(env, "Usage: setNetns(path: string)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string path = info[0].As<Napi::String>();
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ThrowError(env, path, errno);
  int rc = setns(fd, CLONE_NEWNET);
  int saved = errno;
  close(fd);
  if (rc != 0) return ThrowError(env, "setns", saved);
  return env.Undefined();
}

}  // namespace nmi
