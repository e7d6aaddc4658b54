// Who made a TCP connection to nmi, from the kernel: one exact sock_diag
// lookup (NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY without NLM_F_DUMP) of the
// connecting socket by its 4-tuple, in this thread's network namespace. The
// answer carries the socket's owner uid and, since Linux 5.7, the cgroup v2 id
// of the process that created it (INET_DIAG_CGROUP_ID): the same id eBPF's
// bpf_get_current_cgroup_id() reports. Nothing here needs a capability, and no
// other process's /proc is read.
#include <arpa/inet.h>
#include <errno.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "addon.h"

#ifndef INET_DIAG_CGROUP_ID
#define INET_DIAG_CGROUP_ID 21
#endif

namespace nmi {
namespace {

// Fills one end of the request's socket id; false when the text is no address of that family.
bool PutAddress(int family, const std::string& text, __be32* out) {
  return inet_pton(family, text.c_str(), out) == 1;
}

}  // namespace

// socketOwner(localAddress, localPort, remoteAddress, remotePort): the TCP socket
// whose own end is local and whose peer is remote, as
// {uid, inode, cgroupId: bigint | null}; null when this namespace has none.
// Addresses are both IPv4 or both IPv6 (TypeScript unmaps ::ffff: first).
Napi::Value SocketOwner(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 4 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsString() || !info[3].IsNumber()) {
    Napi::TypeError::New(env, "Usage: socketOwner(localAddress: string, localPort: number, remoteAddress: string, remotePort: number)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string local = info[0].As<Napi::String>();
  std::string remote = info[2].As<Napi::String>();
  uint32_t localPort = info[1].As<Napi::Number>().Uint32Value();
  uint32_t remotePort = info[3].As<Napi::Number>().Uint32Value();

  struct {
    nlmsghdr header;
    inet_diag_req_v2 body;
  } request{};
  request.header.nlmsg_len = sizeof(request);
  request.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  request.header.nlmsg_flags = NLM_F_REQUEST;
  request.body.sdiag_protocol = IPPROTO_TCP;
  request.body.idiag_states = ~0u;
  request.body.id.idiag_sport = htons(static_cast<uint16_t>(localPort));
  request.body.id.idiag_dport = htons(static_cast<uint16_t>(remotePort));
  request.body.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
  request.body.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
  int family = local.find(':') == std::string::npos ? AF_INET : AF_INET6;
  request.body.sdiag_family = static_cast<uint8_t>(family);
  if (localPort > 65535 || remotePort > 65535 || !PutAddress(family, local, request.body.id.idiag_src) ||
      !PutAddress(family, remote, request.body.id.idiag_dst)) {
    Napi::TypeError::New(env, "socketOwner: addresses must be both IPv4 or both IPv6, ports 0-65535").ThrowAsJavaScriptException();
    return env.Undefined();
  }

  int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  if (fd < 0) {
    Napi::Error::New(env, std::string("socketOwner: netlink socket: ") + strerror(errno)).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  // The kernel answers at once; the timeout only keeps a broken kernel from hanging the event loop.
  timeval timeout{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  alignas(nlmsghdr) char answer[8192];
  ssize_t got = -1;
  if (sendto(fd, &request, sizeof(request), 0, reinterpret_cast<sockaddr*>(&kernel), sizeof(kernel)) == sizeof(request)) {
    got = recv(fd, answer, sizeof(answer), 0);
  }
  int saved = errno;
  close(fd);
  if (got < 0) {
    Napi::Error::New(env, std::string("socketOwner: sock_diag: ") + strerror(saved)).ThrowAsJavaScriptException();
    return env.Undefined();
  }

  auto* header = reinterpret_cast<nlmsghdr*>(answer);
  if (!NLMSG_OK(header, static_cast<uint32_t>(got))) {
    Napi::Error::New(env, "socketOwner: short sock_diag answer").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (header->nlmsg_type == NLMSG_ERROR) {
    auto* error = static_cast<nlmsgerr*>(NLMSG_DATA(header));
    if (error->error == -ENOENT) return env.Null();
    Napi::Error::New(env, std::string("socketOwner: sock_diag: ") + strerror(-error->error)).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (header->nlmsg_type != SOCK_DIAG_BY_FAMILY || header->nlmsg_len < NLMSG_LENGTH(sizeof(inet_diag_msg))) {
    Napi::Error::New(env, "socketOwner: unexpected sock_diag answer").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto* found = static_cast<inet_diag_msg*>(NLMSG_DATA(header));
  Napi::Object owner = Napi::Object::New(env);
  owner.Set("uid", Napi::Number::New(env, found->idiag_uid));
  owner.Set("inode", Napi::Number::New(env, found->idiag_inode));
  owner.Set("cgroupId", env.Null());
  int left = static_cast<int>(header->nlmsg_len - NLMSG_LENGTH(sizeof(*found)));
  for (auto* attr = reinterpret_cast<rtattr*>(found + 1); RTA_OK(attr, left); attr = RTA_NEXT(attr, left)) {
    if (attr->rta_type == INET_DIAG_CGROUP_ID && RTA_PAYLOAD(attr) >= sizeof(uint64_t)) {
      uint64_t id;
      memcpy(&id, RTA_DATA(attr), sizeof(id));
      owner.Set("cgroupId", Napi::BigInt::New(env, id));
    }
  }
  return owner;
}

}  // namespace nmi
