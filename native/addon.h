// Entry points shared by the addon's translation units. The typed surface the
// TypeScript side sees is src/native/addon.ts; keep the two in step.
#pragma once
#include <napi.h>

namespace nmi {
Napi::Value NftLoad(const Napi::CallbackInfo& info);
Napi::Value NftRun(const Napi::CallbackInfo& info);
Napi::Value SdNotify(const Napi::CallbackInfo& info);
Napi::Value SetNetns(const Napi::CallbackInfo& info);
Napi::Value ServerStart(const Napi::CallbackInfo& info);
Napi::Value ServerRespond(const Napi::CallbackInfo& info);
Napi::Value ServerSetRoutes(const Napi::CallbackInfo& info);
Napi::Value ServerUpdateTokens(const Napi::CallbackInfo& info);
Napi::Value ServerStop(const Napi::CallbackInfo& info);
Napi::Value ServerStats(const Napi::CallbackInfo& info);
}  // namespace nmi
