// execve(2) for `nmi run`: V8's flags are fixed when it starts, node 20 has no
// process.execve, and the daemon must keep its pid (systemd's notify socket, the
// container's init). Which flags, and whether to re-execute at all, is decided in
// TypeScript (src/lifecycle/node-flags.ts); this only makes the call.
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "addon.h"

namespace nmi {

namespace {

// Copies a string[] argument; false (with a JS exception pending) when it is not one.
bool Strings(Napi::Env env, const Napi::Value& value, const char* what, std::vector<std::string>* out) {
  if (!value.IsArray()) {
    Napi::TypeError::New(env, std::string("exec: ") + what + " must be an array of strings").ThrowAsJavaScriptException();
    return false;
  }
  Napi::Array array = value.As<Napi::Array>();
  for (uint32_t i = 0; i < array.Length(); i++) {
    Napi::Value item = array.Get(i);
    if (!item.IsString()) {
      Napi::TypeError::New(env, std::string("exec: ") + what + " must be an array of strings").ThrowAsJavaScriptException();
      return false;
    }
    std::string text = item.As<Napi::String>().Utf8Value();
    if (text.find('\0') != std::string::npos) {
      Napi::TypeError::New(env, std::string("exec: ") + what + " must not contain NUL").ThrowAsJavaScriptException();
      return false;
    }
    out->push_back(std::move(text));
  }
  return true;
}

std::vector<char*> Pointers(std::vector<std::string>& strings) {
  std::vector<char*> pointers;
  for (std::string& s : strings) pointers.push_back(s.data());
  pointers.push_back(nullptr);
  return pointers;
}

}  // namespace

// exec(file: string, argv: string[], env: string[]): never returns when it works, else throws with the errno.
Napi::Value Exec(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if ((info.Length() != 3 && info.Length() != 4) || !info[0].IsString()) {
    Napi::TypeError::New(env, "Usage: exec(file: string, argv: string[], env: string[], keepFds?: number[])").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string file = info[0].As<Napi::String>().Utf8Value();
  std::vector<std::string> argv, envp;
  if (!Strings(env, info[1], "argv", &argv) || !Strings(env, info[2], "env", &envp)) return env.Undefined();
  std::vector<char*> argvPointers = Pointers(argv), envPointers = Pointers(envp);
  // node marks the descriptors it inherited close-on-exec when it starts
  // (uv_disable_stdio_inheritance): the new image must keep stdin, stdout and
  // stderr, and the listening sockets systemd passed (keepFds).
  std::vector<int> keep = {0, 1, 2};
  if (info.Length() == 4) {
    if (!info[3].IsArray()) {
      Napi::TypeError::New(env, "exec: keepFds must be an array of numbers").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    Napi::Array fds = info[3].As<Napi::Array>();
    for (uint32_t i = 0; i < fds.Length(); i++) {
      if (!fds.Get(i).IsNumber()) {
        Napi::TypeError::New(env, "exec: keepFds must be an array of numbers").ThrowAsJavaScriptException();
        return env.Undefined();
      }
      keep.push_back(fds.Get(i).As<Napi::Number>().Int32Value());
    }
  }
  std::vector<int> saved;
  for (int fd : keep) {
    saved.push_back(fcntl(fd, F_GETFD));
    if (saved.back() >= 0) fcntl(fd, F_SETFD, saved.back() & ~FD_CLOEXEC);
  }
  execve(file.c_str(), argvPointers.data(), envPointers.data());
  int error = errno;
  for (size_t i = 0; i < keep.size(); i++) {
    if (saved[i] >= 0) fcntl(keep[i], F_SETFD, saved[i]);
  }
  return ThrowError(env, "", error);
}

}  // namespace nmi
