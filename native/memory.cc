// madvise(MADV_DONTNEED) on clean file-backed mappings: the daemon drops the
// pages of code it ran only while starting. Which ranges are safe is decided
// in TypeScript (src/lifecycle/startup-pages.ts); this only makes the call.
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include <cstdint>

#include "addon.h"

namespace nmi {

// dropPages(start: bigint, length: bigint): null on success, else the errno text.
Napi::Value DropPages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[0].IsBigInt() || !info[1].IsBigInt()) {
    Napi::TypeError::New(env, "Usage: dropPages(start: bigint, length: bigint)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  bool exact = false;
  uint64_t start = info[0].As<Napi::BigInt>().Uint64Value(&exact);
  uint64_t length = exact ? info[1].As<Napi::BigInt>().Uint64Value(&exact) : 0;
  if (!exact) {
    Napi::RangeError::New(env, "dropPages: start and length must fit in 64 bits").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (madvise(reinterpret_cast<void*>(static_cast<uintptr_t>(start)), static_cast<size_t>(length), MADV_DONTNEED) != 0) {
    return Napi::String::New(env, strerror(errno));
  }
  return env.Null();
}

}  // namespace nmi
