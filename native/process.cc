// The daemon's hold on its own memory: no core file and no ptrace by its uid
// (src/lifecycle/core-dumps.ts decides and checks; this is only the calls).
// A watchdog abort would otherwise write tokens and secrets to a core file.
#include <errno.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include "addon.h"

namespace nmi {
namespace {

// RLIM_INFINITY as -1: a 64-bit limit does not fit a JavaScript number.
Napi::Value LimitValue(Napi::Env env, rlim_t limit) {
  return Napi::Number::New(env, limit == RLIM_INFINITY ? -1.0 : static_cast<double>(limit));
}

}  // namespace

// disableCoreDumps(): PR_SET_DUMPABLE 0 and RLIMIT_CORE 0 on this process, then what the kernel
// reports back, as {dumpable, coreSoft, coreHard}; throws with the errno of a call that failed.
Napi::Value DisableCoreDumps(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 0) return ThrowUsage(env, "disableCoreDumps()");
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) return ThrowError(env, "prctl(PR_SET_DUMPABLE)", errno);
  rlimit none{0, 0};
  if (setrlimit(RLIMIT_CORE, &none) != 0) return ThrowError(env, "setrlimit(RLIMIT_CORE)", errno);
  int dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
  if (dumpable < 0) return ThrowError(env, "prctl(PR_GET_DUMPABLE)", errno);
  rlimit now{};
  if (getrlimit(RLIMIT_CORE, &now) != 0) return ThrowError(env, "getrlimit(RLIMIT_CORE)", errno);
  Napi::Object state = Napi::Object::New(env);
  state.Set("dumpable", Napi::Number::New(env, dumpable));
  state.Set("coreSoft", LimitValue(env, now.rlim_cur));
  state.Set("coreHard", LimitValue(env, now.rlim_max));
  return state;
}

}  // namespace nmi
