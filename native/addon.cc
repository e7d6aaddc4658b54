#include "addon.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("nftLoad", Napi::Function::New(env, nmi::NftLoad, "nftLoad"));
  exports.Set("nftRun", Napi::Function::New(env, nmi::NftRun, "nftRun"));
  exports.Set("sdNotify", Napi::Function::New(env, nmi::SdNotify, "sdNotify"));
  exports.Set("setNetns", Napi::Function::New(env, nmi::SetNetns, "setNetns"));
  return exports;
}

NODE_API_MODULE(nmi, Init)
