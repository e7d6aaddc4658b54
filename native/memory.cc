// The daemon's memory calls: madvise(MADV_DONTNEED) on clean file-backed
// mappings, so the daemon drops the pages of code it ran only while starting
// (which ranges are safe is decided in src/lifecycle/startup-pages.ts), and
// mallopt for malloc's thresholds (src/lifecycle/malloc.ts). Only the calls.
#include <errno.h>
#include <malloc.h>
#include <string.h>
#include <sys/mman.h>

#include <cstdint>

#include "addon.h"

namespace nmi {

// dropPages(start: bigint, length: bigint): throws with the errno when madvise refuses.
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
    return ThrowError(env, "", errno);
  }
  return env.Undefined();
}

// setMallocThresholds(bytes: number): M_MMAP_THRESHOLD and M_TRIM_THRESHOLD; throws saying which one malloc
// refused (musl's mallopt refuses all: it has neither).
Napi::Value SetMallocThresholds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int bytes;
  if (!OneNumberArg(info, "setMallocThresholds(bytes: number)", &bytes)) return env.Undefined();
  if (mallopt(M_MMAP_THRESHOLD, bytes) != 1) return ThrowError(env, "mallopt(M_MMAP_THRESHOLD) refused the value");
  if (mallopt(M_TRIM_THRESHOLD, bytes) != 1) return ThrowError(env, "mallopt(M_TRIM_THRESHOLD) refused the value");
  return env.Undefined();
}

}  // namespace nmi
