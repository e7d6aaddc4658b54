// Entry points shared by the addon's translation units. The typed surface the
// TypeScript side sees is src/native/addon.ts; keep the two in step.
#pragma once
#include <napi.h>

#include <sys/socket.h>
#include <sys/un.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nmi {
// How every entry point fails: it throws, and src/native/addon.ts gives what it threw the code
// NMI_ERR_NATIVE_CALL. Both return undefined, for `return Throw...(...)`.
// An Error saying `what`, and with err (an errno) ": strerror(err)" (strerror alone for an empty `what`) and an
// `errno` property.
Napi::Value ThrowError(Napi::Env env, const std::string& what, int err = 0);
// A TypeError "Usage: <usage>": the arguments were not what the call takes.
Napi::Value ThrowUsage(Napi::Env env, const std::string& usage);

// Calls taking one number: false, with a TypeError naming `usage` pending, when info is not that.
bool OneNumberArg(const Napi::CallbackInfo& info, const char* usage, int32_t* out);
// Shared by the descriptor-passing calls (listen.cc, notify.cc).
bool FdArray(Napi::Env env, const Napi::Value& value, size_t max, const char* what, std::vector<int>* out);
int SendWithFds(int sock, const sockaddr_un* to, socklen_t toLen, const std::string& message, const std::vector<int>& fds);

Napi::Value NftLoad(const Napi::CallbackInfo& info);
Napi::Value NftRun(const Napi::CallbackInfo& info);
Napi::Value SdNotify(const Napi::CallbackInfo& info);
Napi::Value ListenTcp(const Napi::CallbackInfo& info);
Napi::Value ListenUnix(const Napi::CallbackInfo& info);
Napi::Value ListeningAddress(const Napi::CallbackInfo& info);
Napi::Value CloseFd(const Napi::CallbackInfo& info);
Napi::Value DupFd(const Napi::CallbackInfo& info);
Napi::Value SendFds(const Napi::CallbackInfo& info);
Napi::Value ReceiveFds(const Napi::CallbackInfo& info);
Napi::Value PeerCredentials(const Napi::CallbackInfo& info);
Napi::Value SetNetns(const Napi::CallbackInfo& info);
Napi::Value DropPages(const Napi::CallbackInfo& info);
Napi::Value SetMallocThresholds(const Napi::CallbackInfo& info);
Napi::Value Exec(const Napi::CallbackInfo& info);
Napi::Value SocketOwner(const Napi::CallbackInfo& info);
Napi::Value DisableCoreDumps(const Napi::CallbackInfo& info);
Napi::Value ServerStart(const Napi::CallbackInfo& info);
Napi::Value ServerRespond(const Napi::CallbackInfo& info);
Napi::Value ServerSetCallers(const Napi::CallbackInfo& info);
Napi::Value ServerUpdateTokens(const Napi::CallbackInfo& info);
Napi::Value ServerStop(const Napi::CallbackInfo& info);
Napi::Value ServerStats(const Napi::CallbackInfo& info);
Napi::Value ServerTakeHits(const Napi::CallbackInfo& info);
Napi::Value BpfSupport(const Napi::CallbackInfo& info);
#ifdef NMI_HAVE_BPF
Napi::Value BpfLoad(const Napi::CallbackInfo& info);
Napi::Value BpfUnload(const Napi::CallbackInfo& info);
Napi::Value BpfRepinMaps(const Napi::CallbackInfo& info);
Napi::Value BpfMapFd(const Napi::CallbackInfo& info);
Napi::Value BpfProgramId(const Napi::CallbackInfo& info);
Napi::Value BpfAttach(const Napi::CallbackInfo& info);
Napi::Value BpfReplace(const Napi::CallbackInfo& info);
Napi::Value BpfLinkInfo(const Napi::CallbackInfo& info);
Napi::Value BpfUnpin(const Napi::CallbackInfo& info);
Napi::Value BpfMapLookup(const Napi::CallbackInfo& info);
Napi::Value BpfMapUpdate(const Napi::CallbackInfo& info);
#endif
}  // namespace nmi
