#!/usr/bin/env bash
# System packages nmi's tests and demo use: rule tools for both iptables
# flavours, nftables (command and library), conntrack, iproute2 for namespaces,
# openssl for test certificates, python3 for a raw-socket client (the eBPF
# backstop's test), wrk for the benchmarks, systemd for unit checks,
# clang with its libFuzzer/sanitizer runtime for the native parser fuzzing;
# for the tests under real runtimes: dpkg-dev (dpkg-shlibdeps, for the package),
# debootstrap and systemd-container (a Debian 12 node booted with
# systemd-nspawn), podman with runc (crun refuses hybrid cgroup hosts);
# kubernetes-client (kubectl 1.20, the oldest kustomize deploy/ is written for)
# to render deploy/'s kustomizations; promtool for the alert rules
# (test/metrics/monitoring.test.ts); libatomic1, which the shipped runtime links
# (scripts/runtime.sh). For the arm64 package (npm run package -- --arch arm64)
# and its test under emulation: Debian's cross compiler, the arm64 libraries the
# addon and the runtime link (multiarch), and qemu-user-static with binfmt_misc.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then echo "install-deps: run as root" >&2; exit 2; fi
export DEBIAN_FRONTEND=noninteractive
# A kubectl already installed renders deploy/ as well; Google's `kubectl` package owns
# /usr/bin/kubectl, and kubernetes-client would fail to install beside it.
kubectl=kubernetes-client
if command -v kubectl >/dev/null; then kubectl=; fi
dpkg --add-architecture arm64  # a no-op once added
# A mirror sometimes drops answers for minutes (as scripts/debian-root.sh finds):
# apt retries each file itself, and each step is tried five times, 15 s to 2 min
# apart, ~4 min in all. Update and install are one step: an update that missed an
# index only warns, and the install that then finds no package updates again.
retry() {
  for try in 1 2 3 4 5; do
    "$@" && return 0
    echo "install-deps: $* failed (try $try of 5)" >&2
    [ "$try" -lt 5 ] || return 1
    sleep $((15 << (try - 1)))
  done
}
apt_get() { apt-get -o Acquire::Retries=5 "$@"; }
packages() {
  apt_get update -q && apt_get install -y -q --no-install-recommends \
    iptables nftables libnftables1 conntrack iproute2 openssl ca-certificates python3 \
    procps wrk systemd clang libclang-rt-14-dev libbpf-dev bpftool libatomic1 \
    dpkg-dev debootstrap systemd-container podman runc $kubectl \
    g++-aarch64-linux-gnu libbpf-dev:arm64 libelf-dev:arm64 libstdc++6:arm64 libatomic1:arm64 \
    qemu-user-static binfmt-support
}
retry packages
# arm64 programs run under qemu through binfmt_misc (the package's F flag: the
# interpreter is opened now, so it works inside a chroot too).
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
# promtool alone, out of Debian's prometheus package: installing the package would
# also start a Prometheus server. Kept where the tests look for it.
cache=${NMI_TEST_CACHE:-/var/cache/nmi-test}
if [ ! -x "$cache/promtool" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # As root: apt's own download user may not write into root's temporary folder.
  (cd "$tmp" && retry apt_get download -q -o APT::Sandbox::User=root prometheus)
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  install -m 0755 "$tmp/usr/bin/promtool" "$cache/promtool.tmp"
  mv "$cache/promtool.tmp" "$cache/promtool"
fi
