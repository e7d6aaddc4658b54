// libnftables, loaded at run time so the addon builds and loads on hosts
// without it; the TypeScript side then falls back to `nft -j -f -`.
#include <dlfcn.h>

#include <string>

#include "addon.h"

namespace {

struct nft_ctx;
constexpr unsigned kOutputJson = 1u << 4;  // NFT_CTX_OUTPUT_JSON
constexpr unsigned kOutputHandle = 1u << 3;  // NFT_CTX_OUTPUT_HANDLE

struct Lib {
  void* handle = nullptr;
  std::string error;
  nft_ctx* (*ctx_new)(unsigned) = nullptr;
  void (*ctx_free)(nft_ctx*) = nullptr;
  void (*output_set_flags)(nft_ctx*, unsigned) = nullptr;
  int (*buffer_output)(nft_ctx*) = nullptr;
  int (*buffer_error)(nft_ctx*) = nullptr;
  const char* (*get_output)(nft_ctx*) = nullptr;
  const char* (*get_error)(nft_ctx*) = nullptr;
  int (*run_cmd)(nft_ctx*, const char*) = nullptr;
};

template <typename T>
bool Sym(Lib& lib, T& slot, const char* name) {
  slot = reinterpret_cast<T>(dlsym(lib.handle, name));
  if (slot == nullptr) lib.error = std::string("libnftables lacks ") + name;
  return slot != nullptr;
}

Lib& Load() {
  static Lib lib = [] {
    Lib l;
    const char* names[] = {"libnftables.so.1", "libnftables.so"};
    for (const char* name : names) {
      l.handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (l.handle != nullptr) break;
    }
    if (l.handle == nullptr) {
      l.error = "cannot load libnftables.so.1 or libnftables.so";
      return l;
    }
    bool ok = Sym(l, l.ctx_new, "nft_ctx_new") && Sym(l, l.ctx_free, "nft_ctx_free") &&
              Sym(l, l.output_set_flags, "nft_ctx_output_set_flags") &&
              Sym(l, l.buffer_output, "nft_ctx_buffer_output") &&
              Sym(l, l.buffer_error, "nft_ctx_buffer_error") &&
              Sym(l, l.get_output, "nft_ctx_get_output_buffer") &&
              Sym(l, l.get_error, "nft_ctx_get_error_buffer") &&
              Sym(l, l.run_cmd, "nft_run_cmd_from_buffer");
    if (!ok) {
      dlclose(l.handle);
      l.handle = nullptr;
    }
    return l;
  }();
  return lib;
}

}  // namespace

namespace nmi {

// nftLoad(): null when libnftables is usable, else why not.
Napi::Value NftLoad(const Napi::CallbackInfo& info) {
  Lib& lib = Load();
  if (lib.handle != nullptr) return info.Env().Null();
  return Napi::String::New(info.Env(), lib.error);
}

// nftRun(commands, json): {ok, output, error}. One call is one nft transaction.
Napi::Value NftRun(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[0].IsString() || !info[1].IsBoolean()) {
    Napi::TypeError::New(env, "Usage: nftRun(commands: string, json: boolean)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Lib& lib = Load();
  if (lib.handle == nullptr) {
    Napi::Error::New(env, lib.error).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string commands = info[0].As<Napi::String>();
  nft_ctx* ctx = lib.ctx_new(0);
  if (ctx == nullptr) {
    Napi::Error::New(env, "nft_ctx_new failed").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  lib.output_set_flags(ctx, info[1].As<Napi::Boolean>() ? (kOutputJson | kOutputHandle) : kOutputHandle);
  lib.buffer_output(ctx);
  lib.buffer_error(ctx);
  int rc = lib.run_cmd(ctx, commands.c_str());
  Napi::Object result = Napi::Object::New(env);
  result.Set("ok", Napi::Boolean::New(env, rc == 0));
  const char* out = lib.get_output(ctx);
  const char* err = lib.get_error(ctx);
  result.Set("output", Napi::String::New(env, out != nullptr ? out : ""));
  result.Set("error", Napi::String::New(env, err != nullptr ? err : ""));
  lib.ctx_free(ctx);
  return result;
}

}  // namespace nmi
