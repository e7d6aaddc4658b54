#include "addon.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("nftLoad", Napi::Function::New(env, nmi::NftLoad, "nftLoad"));
  exports.Set("nftRun", Napi::Function::New(env, nmi::NftRun, "nftRun"));
  exports.Set("sdNotify", Napi::Function::New(env, nmi::SdNotify, "sdNotify"));
  exports.Set("setNetns", Napi::Function::New(env, nmi::SetNetns, "setNetns"));
  exports.Set("serverStart", Napi::Function::New(env, nmi::ServerStart, "serverStart"));
  exports.Set("serverRespond", Napi::Function::New(env, nmi::ServerRespond, "serverRespond"));
  exports.Set("serverSetRoutes", Napi::Function::New(env, nmi::ServerSetRoutes, "serverSetRoutes"));
  exports.Set("serverUpdateTokens", Napi::Function::New(env, nmi::ServerUpdateTokens, "serverUpdateTokens"));
  exports.Set("serverStop", Napi::Function::New(env, nmi::ServerStop, "serverStop"));
  exports.Set("serverStats", Napi::Function::New(env, nmi::ServerStats, "serverStats"));
  return exports;
}

NODE_API_MODULE(nmi, Init)
