// nmi's eBPF redirect (--rules ebpf), attached at --cgroup-root:
//  - cgroup/connect4 rewrites a pod's TCP connect to the metadata address into
//    one to nmi's own address and port (no NAT, no conntrack), and remembers on
//    the socket which cgroup connected it;
//  - cgroup/connect6 does the same for a dual-stack IPv6 socket that reaches
//    the metadata address as ::ffff:169.254.169.254 (Java's sockets do by
//    default): connect4 never sees those, and they would reach IMDS untouched;
//  - sockops records, once the local port is chosen, the connection's 4-tuple
//    → that cgroup, which nmi's servers read to attest the caller;
//  - cgroup/getpeername4 and getpeername6 show the pod the address it asked for.
// Addresses and ports are kept in network byte order throughout.
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif

// Keep in step with src/rules/ebpf.ts (configBytes, peerKey).
struct nmi_config {
  __u32 metadata_ip;
  __u32 target_ip;
  __u16 metadata_port;
  __u16 target_port;
  __u32 pad;
  __u64 self_cgroup;  // nmi's own cgroup: its calls to the real IMDS are never redirected
};

struct peer_key {
  __u32 src_ip;
  __u32 dst_ip;
  __u16 src_port;
  __u16 dst_port;
};

struct sock_mark {
  __u64 cgroup;
  __u32 redirected;
  __u32 pad;
};

struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, 1);
  __type(key, __u32);
  __type(value, struct nmi_config);
} nmi_config SEC(".maps");

// LRU: entries of connections nmi never accepted (a pod that gave up) age out.
struct {
  __uint(type, BPF_MAP_TYPE_LRU_HASH);
  __uint(max_entries, 65536);
  __type(key, struct peer_key);
  __type(value, __u64);
} nmi_peers SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_SK_STORAGE);
  __uint(map_flags, BPF_F_NO_PREALLOC);
  __type(key, int);
  __type(value, struct sock_mark);
} nmi_socks SEC(".maps");

static __always_inline struct nmi_config *config(void) {
  __u32 zero = 0;
  struct nmi_config *c = bpf_map_lookup_elem(&nmi_config, &zero);
  return c && c->target_ip ? c : 0;
}

enum verdict { REFUSE = 0, PASS = 1, REDIRECT = 2 };

// A TCP connect to ip (IPv4, network order) and the context's port: to the
// metadata address it is redirected, to nmi's own address passed; both are
// marked with the connecting cgroup for attestation. nmi's own calls pass.
static __always_inline enum verdict judge(struct bpf_sock_addr *ctx, struct nmi_config *c, __u32 ip) {
  if (ctx->type != SOCK_STREAM) return PASS;
  __u16 port = (__u16)ctx->user_port;
  int to_metadata = ip == c->metadata_ip && port == c->metadata_port;
  int to_target = ip == c->target_ip && port == c->target_port;
  if (!to_metadata && !to_target) return PASS;
  __u64 cgroup = bpf_get_current_cgroup_id();
  if (cgroup == c->self_cgroup) return PASS;
  struct sock_mark *mark = bpf_sk_storage_get(&nmi_socks, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
  // Without the mark the call could not be attested: refuse it (EPERM) rather than let it through unredirected.
  if (!mark) return REFUSE;
  mark->cgroup = cgroup;
  mark->redirected = to_metadata;
  return to_metadata ? REDIRECT : PASS;
}

SEC("cgroup/connect4")
int nmi_connect4(struct bpf_sock_addr *ctx) {
  struct nmi_config *c = config();
  if (!c) return 1;
  enum verdict v = judge(ctx, c, ctx->user_ip4);
  if (v == REDIRECT) {
    ctx->user_ip4 = c->target_ip;
    ctx->user_port = c->target_port;
  }
  return v != REFUSE;
}

/** ::ffff:a.b.c.d, an IPv4 address on an IPv6 socket. */
static __always_inline int v4_mapped(struct bpf_sock_addr *ctx) {
  return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0xffff);
}

SEC("cgroup/connect6")
int nmi_connect6(struct bpf_sock_addr *ctx) {
  struct nmi_config *c = config();
  if (!c || !v4_mapped(ctx)) return 1;
  enum verdict v = judge(ctx, c, ctx->user_ip6[3]);
  if (v == REDIRECT) {
    ctx->user_ip6[3] = c->target_ip;
    ctx->user_port = c->target_port;
  }
  return v != REFUSE;
}

SEC("sockops")
int nmi_sockops(struct bpf_sock_ops *ops) {
  // An AF_INET6 socket is marked only when it connected to a v4-mapped address: its ip4 fields hold the IPv4 4-tuple.
  if (ops->op != BPF_SOCK_OPS_TCP_CONNECT_CB || (ops->family != AF_INET && ops->family != AF_INET6)) return 1;
  struct bpf_sock *sk = ops->sk;
  if (!sk) return 1;
  struct sock_mark *mark = bpf_sk_storage_get(&nmi_socks, sk, 0, 0);
  if (!mark) return 1;
  // remote_port holds the network-order port in its upper 16 bits on little-endian kernels.
  __u32 remote_port = ops->remote_port;
  struct peer_key key = {
      .src_ip = ops->local_ip4,
      .dst_ip = ops->remote_ip4,
      .src_port = bpf_htons((__u16)ops->local_port),  // local_port is in host order
      .dst_port = (__u16)(remote_port > 0xffff ? remote_port >> 16 : remote_port),
  };
  __u64 cgroup = mark->cgroup;
  bpf_map_update_elem(&nmi_peers, &key, &cgroup, BPF_ANY);
  return 1;
}

// The config when the socket's connect was redirected, so getpeername shows the metadata address; else 0.
static __always_inline struct nmi_config *redirected(struct bpf_sock_addr *ctx) {
  struct nmi_config *c = config();
  if (!c) return 0;
  struct sock_mark *mark = bpf_sk_storage_get(&nmi_socks, ctx->sk, 0, 0);
  return mark && mark->redirected ? c : 0;
}

SEC("cgroup/getpeername4")
int nmi_getpeername4(struct bpf_sock_addr *ctx) {
  struct nmi_config *c = redirected(ctx);
  if (c) {
    ctx->user_ip4 = c->metadata_ip;
    ctx->user_port = c->metadata_port;
  }
  return 1;
}

SEC("cgroup/getpeername6")
int nmi_getpeername6(struct bpf_sock_addr *ctx) {
  // Redirected only by connect6, so the peer is v4-mapped: its last word is the IPv4 address.
  struct nmi_config *c = redirected(ctx);
  if (c) {
    ctx->user_ip6[3] = c->metadata_ip;
    ctx->user_port = c->metadata_port;
  }
  return 1;
}

char LICENSE[] SEC("license") = "GPL";
