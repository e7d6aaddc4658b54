#include "addon.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("nftLoad", Napi::Function::New(env, nmi::NftLoad, "nftLoad"));
  exports.Set("nftRun", Napi::Function::New(env, nmi::NftRun, "nftRun"));
  exports.Set("sdNotify", Napi::Function::New(env, nmi::SdNotify, "sdNotify"));
  exports.Set("listenTcp", Napi::Function::New(env, nmi::ListenTcp, "listenTcp"));
  exports.Set("listenUnix", Napi::Function::New(env, nmi::ListenUnix, "listenUnix"));
  exports.Set("listeningAddress", Napi::Function::New(env, nmi::ListeningAddress, "listeningAddress"));
  exports.Set("closeFd", Napi::Function::New(env, nmi::CloseFd, "closeFd"));
  exports.Set("dupFd", Napi::Function::New(env, nmi::DupFd, "dupFd"));
  exports.Set("sendFds", Napi::Function::New(env, nmi::SendFds, "sendFds"));
  exports.Set("receiveFds", Napi::Function::New(env, nmi::ReceiveFds, "receiveFds"));
  exports.Set("peerCredentials", Napi::Function::New(env, nmi::PeerCredentials, "peerCredentials"));
  exports.Set("setNetns", Napi::Function::New(env, nmi::SetNetns, "setNetns"));
  exports.Set("dropPages", Napi::Function::New(env, nmi::DropPages, "dropPages"));
  exports.Set("setMallocThresholds", Napi::Function::New(env, nmi::SetMallocThresholds, "setMallocThresholds"));
  exports.Set("exec", Napi::Function::New(env, nmi::Exec, "exec"));
  exports.Set("socketOwner", Napi::Function::New(env, nmi::SocketOwner, "socketOwner"));
  exports.Set("disableCoreDumps", Napi::Function::New(env, nmi::DisableCoreDumps, "disableCoreDumps"));
  exports.Set("serverStart", Napi::Function::New(env, nmi::ServerStart, "serverStart"));
  exports.Set("serverRespond", Napi::Function::New(env, nmi::ServerRespond, "serverRespond"));
  exports.Set("serverSetCallers", Napi::Function::New(env, nmi::ServerSetCallers, "serverSetCallers"));
  exports.Set("serverUpdateTokens", Napi::Function::New(env, nmi::ServerUpdateTokens, "serverUpdateTokens"));
  exports.Set("serverStop", Napi::Function::New(env, nmi::ServerStop, "serverStop"));
  exports.Set("serverStats", Napi::Function::New(env, nmi::ServerStats, "serverStats"));
  exports.Set("serverTakeHits", Napi::Function::New(env, nmi::ServerTakeHits, "serverTakeHits"));
  exports.Set("bpfSupport", Napi::Function::New(env, nmi::BpfSupport, "bpfSupport"));
#ifdef NMI_HAVE_BPF
  exports.Set("bpfLoad", Napi::Function::New(env, nmi::BpfLoad, "bpfLoad"));
  exports.Set("bpfUnload", Napi::Function::New(env, nmi::BpfUnload, "bpfUnload"));
  exports.Set("bpfRepinMaps", Napi::Function::New(env, nmi::BpfRepinMaps, "bpfRepinMaps"));
  exports.Set("bpfMapFd", Napi::Function::New(env, nmi::BpfMapFd, "bpfMapFd"));
  exports.Set("bpfProgramId", Napi::Function::New(env, nmi::BpfProgramId, "bpfProgramId"));
  exports.Set("bpfAttach", Napi::Function::New(env, nmi::BpfAttach, "bpfAttach"));
  exports.Set("bpfReplace", Napi::Function::New(env, nmi::BpfReplace, "bpfReplace"));
  exports.Set("bpfLinkInfo", Napi::Function::New(env, nmi::BpfLinkInfo, "bpfLinkInfo"));
  exports.Set("bpfUnpin", Napi::Function::New(env, nmi::BpfUnpin, "bpfUnpin"));
  exports.Set("bpfMapLookup", Napi::Function::New(env, nmi::BpfMapLookup, "bpfMapLookup"));
  exports.Set("bpfMapUpdate", Napi::Function::New(env, nmi::BpfMapUpdate, "bpfMapUpdate"));
#endif
  return exports;
}

NODE_API_MODULE(nmi, Init)
