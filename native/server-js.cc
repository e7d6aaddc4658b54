// The native token server's calls from JavaScript (src/native/addon.ts types
// them): serverStart and the rest turn JS values into a server.h Server and
// back, keep the servers JavaScript can name, and deliver deferred requests on
// the JS thread. The loop itself is server.cc's.
#include <errno.h>
#include <fcntl.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "addon.h"
#include "server.h"

namespace nmi {
namespace server {
namespace {

std::mutex gServersMutex;
std::unordered_map<uint32_t, std::shared_ptr<Server>> gServers;
uint32_t gNextServer = 1;

std::shared_ptr<Server> FindServerById(uint32_t id) {
  std::lock_guard<std::mutex> lock(gServersMutex);
  auto it = gServers.find(id);
  return it == gServers.end() ? nullptr : it->second;
}

std::shared_ptr<Server> FindServer(const Napi::Value& v) {
  return v.IsNumber() ? FindServerById(v.As<Napi::Number>().Uint32Value()) : nullptr;
}

// At environment teardown: stop the thread without waiting for JS. Registered
// after the server's thread-safe function, so it runs before node closes it.
void StopAtExit(void* arg) { static_cast<Server*>(arg)->StopNow(); }

const char* const kStartUsage =
    "serverStart({fd, maxConnections, maxConnectionsPerSource, maxHeaderBytes, maxBodyBytes, headerTimeoutMs, "
    "keepAliveTimeoutMs, writeTimeoutMs, maxUnsentBytes, maxDeferredBytesPerConnection, maxDeferredRequests, "
    "maxDeferredBytes, metadataHeaderRequired, multipleIdentities: 'first' | 'refuse', apiVersions: string[], "
    "busyAnswer: [head, body], tooManyConnectionsAnswer: [head, body], countHits?, peerMapFd?}, onRequest)";

// A [head, body] pair of strings.
bool ReadFixedAnswer(const Napi::Value& v, FixedAnswer* out) {
  if (!v.IsArray()) return false;
  Napi::Array a = v.As<Napi::Array>();
  Napi::Value head = a[0u], body = a[1u];
  if (a.Length() != 2 || !head.IsString() || !body.IsString()) return false;
  out->head = head.As<Napi::String>();
  out->body = body.As<Napi::String>();
  return true;
}

// An array of strings.
bool ReadStrings(const Napi::Value& v, std::unordered_set<std::string>* out) {
  if (!v.IsArray()) return false;
  Napi::Array a = v.As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); i++) {
    Napi::Value item = a[i];
    if (!item.IsString()) return false;
    out->insert(item.As<Napi::String>());
  }
  return true;
}

}  // namespace

void CallJs(Napi::Env env, Napi::Function fn, Deferred* data) {
  std::unique_ptr<Deferred> owned(data);
  if (env == nullptr || fn == nullptr) return;
  if (data->connId == 0) {
    // The thread has finished: join it and forget the server, then tell JS.
    std::shared_ptr<Server> s = FindServerById(data->serverId);
    if (s) {
      s->Join();
      napi_remove_env_cleanup_hook(env, StopAtExit, s.get());
    }
    // Still findable while JavaScript hears it: the last hit counts are taken then (serverTakeHits).
    fn.Call({Napi::Number::New(env, 0), Napi::Number::New(env, 0), env.Null(), Napi::String::New(env, ""),
             Napi::String::New(env, "stopped")});
    std::lock_guard<std::mutex> lock(gServersMutex);
    gServers.erase(data->serverId);
    return;
  }
  fn.Call({Napi::Number::New(env, static_cast<double>(data->connId)),
           Napi::Number::New(env, static_cast<double>(data->requestId)),
           Napi::Buffer<char>::Copy(env, data->bytes.data(), data->bytes.size()), Napi::String::New(env, data->remote),
           data->error.empty() ? env.Null() : Napi::String::New(env, data->error)});
}

}  // namespace server

using server::FindServer;
using server::Server;

// The options' values are checked in TypeScript (src/server/native-server.ts); here only their types.
Napi::Value ServerStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[0].IsObject() || !info[1].IsFunction()) return ThrowUsage(env, server::kStartUsage);
  Napi::Object o = info[0].As<Napi::Object>();
  for (const char* k : {"fd", "maxConnections", "maxConnectionsPerSource", "maxHeaderBytes", "maxBodyBytes",
                        "headerTimeoutMs", "keepAliveTimeoutMs", "writeTimeoutMs", "maxUnsentBytes",
                        "maxDeferredBytesPerConnection", "maxDeferredRequests", "maxDeferredBytes"})
    if (!o.Get(k).IsNumber()) return ThrowUsage(env, server::kStartUsage);
  Napi::Value multiple = o.Get("multipleIdentities");
  if (!o.Get("metadataHeaderRequired").IsBoolean() || !multiple.IsString()) return ThrowUsage(env, server::kStartUsage);
  std::string multipleIdentities = multiple.As<Napi::String>();
  if (multipleIdentities != "first" && multipleIdentities != "refuse") return ThrowUsage(env, server::kStartUsage);

  auto s = std::make_shared<Server>();
  if (!server::ReadFixedAnswer(o.Get("busyAnswer"), &s->busyAnswer) ||
      !server::ReadFixedAnswer(o.Get("tooManyConnectionsAnswer"), &s->tooManyConnectionsAnswer) ||
      !server::ReadStrings(o.Get("apiVersions"), &s->rules.apiVersions))
    return ThrowUsage(env, server::kStartUsage);
  auto number = [&](const char* k) { return o.Get(k).As<Napi::Number>(); };
  s->maxConnections = number("maxConnections").Uint32Value();
  s->maxConnectionsPerSource = number("maxConnectionsPerSource").Uint32Value();
  s->maxDeferredRequests = number("maxDeferredRequests").Uint32Value();
  s->maxDeferredBytes = number("maxDeferredBytes").Uint32Value();
  s->limits.maxHeaderBytes = number("maxHeaderBytes").Uint32Value();
  s->limits.maxBodyBytes = number("maxBodyBytes").Uint32Value();
  s->limits.headerTimeoutMs = number("headerTimeoutMs").Int64Value();
  s->limits.keepAliveMs = number("keepAliveTimeoutMs").Int64Value();
  s->limits.writeTimeoutMs = number("writeTimeoutMs").Int64Value();
  s->limits.maxUnsentBytes = number("maxUnsentBytes").Uint32Value();
  s->limits.maxDeferredBytes = number("maxDeferredBytesPerConnection").Uint32Value();
  s->rules.metadataHeaderRequired = o.Get("metadataHeaderRequired").As<Napi::Boolean>();
  s->rules.multipleIdentities =
      multipleIdentities == "first" ? imds::MultipleIdentities::kFirst : imds::MultipleIdentities::kRefuse;
  // As node says its keepAliveTimeout in Keep-Alive: timeout=.
  s->rules.keepAliveS = s->limits.keepAliveMs / 1000;
  Napi::Value countHits = o.Get("countHits");
  if (!countHits.IsUndefined() && !countHits.IsBoolean()) return ThrowUsage(env, server::kStartUsage);
  s->countHits = countHits.IsBoolean() && countHits.As<Napi::Boolean>().Value();
  // The server keeps its own descriptor of the map: the caller's may be closed first.
  if (o.Get("peerMapFd").IsNumber()) {
    s->peerMapFd = fcntl(o.Get("peerMapFd").As<Napi::Number>().Int32Value(), F_DUPFD_CLOEXEC, 0);
    if (s->peerMapFd < 0) return ThrowError(env, "serverStart: peerMapFd", errno);
  }
  std::string failed = s->Open(o.Get("fd").As<Napi::Number>().Int32Value());
  if (!failed.empty()) return ThrowError(env, "serverStart: " + failed);

  // Bounded as the requests JavaScript may hold, and one more for "stopped".
  s->onRequest = Napi::ThreadSafeFunction::New(env, info[1].As<Napi::Function>(), "nmi-native-server",
                                               s->maxDeferredRequests + 1, 1);
  napi_add_env_cleanup_hook(env, server::StopAtExit, s.get());
  uint32_t id;
  {
    std::lock_guard<std::mutex> lock(server::gServersMutex);
    id = server::gNextServer++;
    server::gServers[id] = s;
  }
  s->id = id;
  s->Start();
  Napi::Object result = Napi::Object::New(env);
  result.Set("id", Napi::Number::New(env, id));
  result.Set("port", Napi::Number::New(env, s->Port()));
  return result;
}

Napi::Value ServerRespond(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 5 || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsBuffer() || !info[4].IsBoolean())
    return ThrowUsage(env, "serverRespond(server, connId, requestId, bytes: Buffer, close: boolean)");
  auto s = FindServer(info[0]);
  if (!s) return env.Undefined();  // stopped meanwhile: the answer has nowhere to go
  auto buf = info[3].As<Napi::Buffer<char>>();
  s->Respond(server::Response{static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value()),
                              static_cast<uint64_t>(info[2].As<Napi::Number>().Int64Value()),
                              std::string(buf.Data(), buf.Length()), info[4].As<Napi::Boolean>()});
  return env.Undefined();
}

// serverSetCallers(server, [[[key, clientIdLower, resourceIdLower], ...], ...], [[callerKey, exception, list], ...]):
// each caller entry names its identities by index into the lists, so entries with the same identities share one list.
Napi::Value ServerSetCallers(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* usage = "serverSetCallers(server, [[[key, clientIdLower, resourceIdLower]]], [[callerKey, exception, list]])";
  if (info.Length() != 3 || !info[1].IsArray() || !info[2].IsArray()) return ThrowUsage(env, usage);
  auto s = FindServer(info[0]);
  if (!s) return env.Undefined();
  std::vector<imds::IdentityList> lists;
  Napi::Array listRows = info[1].As<Napi::Array>();
  for (uint32_t i = 0; i < listRows.Length(); i++) {
    Napi::Value item = listRows[i];
    if (!item.IsArray()) return ThrowUsage(env, usage);
    Napi::Array ids = item.As<Napi::Array>();
    auto list = std::make_shared<std::vector<imds::CallerIdentity>>();
    list->reserve(ids.Length());
    for (uint32_t j = 0; j < ids.Length(); j++) {
      Napi::Value id = ids[j];
      if (!id.IsArray()) return ThrowUsage(env, usage);
      Napi::Array t = id.As<Napi::Array>();
      Napi::Value k = t[0u], c = t[1u], rid = t[2u];
      if (!k.IsString() || !c.IsString() || !rid.IsString()) return ThrowUsage(env, usage);
      list->push_back(imds::CallerIdentity{k.As<Napi::String>(), c.As<Napi::String>(), rid.As<Napi::String>()});
    }
    lists.emplace_back(std::move(list));
  }
  auto table = std::make_shared<imds::CallerTable>();
  Napi::Array rows = info[2].As<Napi::Array>();
  table->reserve(rows.Length());
  for (uint32_t i = 0; i < rows.Length(); i++) {
    Napi::Value row = rows[i];
    if (!row.IsArray()) return ThrowUsage(env, usage);
    Napi::Array r = row.As<Napi::Array>();
    Napi::Value key = r[0u], exc = r[1u], list = r[2u];
    if (!key.IsString() || !exc.IsBoolean() || !list.IsNumber()) return ThrowUsage(env, usage);
    uint32_t index = list.As<Napi::Number>().Uint32Value();
    if (index >= lists.size()) return ThrowUsage(env, usage);
    (*table)[key.As<Napi::String>()] = imds::CallerEntry{exc.As<Napi::Boolean>(), lists[index]};
  }
  s->SetCallers(std::move(table));
  return env.Undefined();
}

// serverUpdateTokens(server, [[identityKey, resource, prefix, suffix, expiresOn, serveUntilMs], ...], [[identityKey, resource], ...]):
// adds or replaces the first list's tokens and removes the second's, in one swap.
Napi::Value ServerUpdateTokens(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* usage =
      "serverUpdateTokens(server, [[identityKey, resource, prefix, suffix, expiresOn, serveUntilMs]], [[identityKey, resource]])";
  if (info.Length() != 3 || !info[1].IsArray() || !info[2].IsArray()) return ThrowUsage(env, usage);
  auto s = FindServer(info[0]);
  if (!s) return env.Undefined();
  std::vector<std::pair<std::string, std::shared_ptr<const imds::TokenEntry>>> upserts;
  Napi::Array rows = info[1].As<Napi::Array>();
  upserts.reserve(rows.Length());
  for (uint32_t i = 0; i < rows.Length(); i++) {
    Napi::Value row = rows[i];
    if (!row.IsArray()) return ThrowUsage(env, usage);
    Napi::Array r = row.As<Napi::Array>();
    Napi::Value k = r[0u], res = r[1u], pre = r[2u], suf = r[3u], exp = r[4u], until = r[5u];
    if (!k.IsString() || !res.IsString() || !pre.IsString() || !suf.IsString() || !exp.IsNumber() || !until.IsNumber())
      return ThrowUsage(env, usage);
    upserts.emplace_back(imds::TokenKey(k.As<Napi::String>(), res.As<Napi::String>()),
                         std::make_shared<const imds::TokenEntry>(imds::TokenEntry{
                             s->Body(pre.As<Napi::String>(), suf.As<Napi::String>()), exp.As<Napi::Number>().Int64Value(),
                             until.As<Napi::Number>().Int64Value()}));
  }
  std::vector<std::string> removals;
  Napi::Array keys = info[2].As<Napi::Array>();
  for (uint32_t i = 0; i < keys.Length(); i++) {
    Napi::Value row = keys[i];
    if (!row.IsArray()) return ThrowUsage(env, usage);
    Napi::Array r = row.As<Napi::Array>();
    Napi::Value k = r[0u], res = r[1u];
    if (!k.IsString() || !res.IsString()) return ThrowUsage(env, usage);
    removals.push_back(imds::TokenKey(k.As<Napi::String>(), res.As<Napi::String>()));
  }
  s->UpdateTokens(std::move(upserts), removals);
  return env.Undefined();
}

// serverTakeHits(server): [[tokenKey, hits], ...] since the last call; null once the server is gone.
Napi::Value ServerTakeHits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 1) return ThrowUsage(env, "serverTakeHits(server)");
  auto s = FindServer(info[0]);
  if (!s) return env.Null();
  auto taken = s->TakeHits();
  Napi::Array out = Napi::Array::New(env, taken.size());
  for (uint32_t i = 0; i < taken.size(); i++) {
    Napi::Array pair = Napi::Array::New(env, 2);
    pair.Set(0u, Napi::String::New(env, taken[i].first));
    pair.Set(1u, Napi::Number::New(env, static_cast<double>(taken[i].second)));
    out.Set(i, pair);
  }
  return out;
}

// serverStop(server, drainMs): stops accepting, lets queued answers go out (at
// most drainMs), closes every connection; onRequest then gets error "stopped".
Napi::Value ServerStop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[1].IsNumber()) return ThrowUsage(env, "serverStop(server, drainMs)");
  auto s = FindServer(info[0]);
  return Napi::Boolean::New(env, s && s->Stop(info[1].As<Napi::Number>().Int64Value()));
}

Napi::Value ServerStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto s = FindServer(info[0]);
  if (!s) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  auto put = [&](const char* k, const std::atomic<uint64_t>& v) { o.Set(k, Napi::Number::New(env, static_cast<double>(v.load()))); };
  put("connections", s->stats.connections);
  put("hits", s->stats.hits);
  put("deferredToJs", s->stats.deferredToJs);
  put("malformed", s->stats.malformed);
  put("overflow", s->stats.overflow);
  put("timeout", s->stats.timeout);
  put("refusedConnections", s->stats.refusedConnections);
  put("busy", s->stats.busy);
  put("writeTimeouts", s->stats.writeTimeouts);
  put("acceptErrors", s->stats.acceptErrors);
  return o;
}

}  // namespace nmi
