// The one way the addon's entry points report failure to JavaScript (addon.h).
#include <string.h>

#include <string>

#include "addon.h"

namespace nmi {

Napi::Value ThrowError(Napi::Env env, const std::string& what, int err) {
  std::string message = !err ? what : what.empty() ? std::string(strerror(err)) : what + ": " + strerror(err);
  Napi::Error e = Napi::Error::New(env, message);
  if (err) e.Set("errno", Napi::Number::New(env, err));
  e.ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value ThrowUsage(Napi::Env env, const std::string& usage) {
  Napi::TypeError::New(env, "Usage: " + usage).ThrowAsJavaScriptException();
  return env.Undefined();
}

}  // namespace nmi
