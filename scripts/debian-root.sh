#!/usr/bin/env bash
# `debian-root.sh [arm64]` prints the path of a Debian 12 root file system for
# the tests under real systemd (systemd-nspawn --boot) and podman (imported as
# the image's base), or, with arm64, the same for arm64, for the arm64 package's
# tests under qemu (binfmt_misc runs debootstrap's second stage, ~2 min here),
# building it with debootstrap the first time. Slow (minutes) and the same every
# run, so it is cached under /var/cache/nmi-test, keyed by what goes into it;
# a flock makes parallel test files wait for one build instead of racing.
#
# minbase plus what a Kubernetes node has anyway (systemd, iptables, nftables,
# conntrack, iproute2): stricter than a stock Debian 12, so a dependency the
# package forgot to declare shows up here as a failed `dpkg -i`.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then echo "debian-root: run as root" >&2; exit 2; fi
suite=bookworm
include=systemd,systemd-sysv,dbus,iptables,nftables,conntrack,iproute2,kmod,procps,libelf1,libatomic1
arch=${1:-$(dpkg --print-architecture)}
case $arch in
  "$(dpkg --print-architecture)" | arm64) ;;
  *) echo "debian-root: the host's architecture or arm64, not $arch" >&2; exit 2 ;;
esac
key=$(printf '%s %s %s' "$suite" "$include" "$arch" | sha256sum | cut -c1-12)
cache=${NMI_TEST_CACHE:-/var/cache/nmi-test}
root="$cache/debian-$suite-$key"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ ! -e "$root/.complete" ]; then
  # The mirror this machine's apt already uses, so no host is written here.
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p;T;q' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "'"$suite"'" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
  [ -n "$mirror" ] || { echo "debian-root: no Debian mirror in apt's sources" >&2; exit 1; }
  # A mirror sometimes drops answers for minutes ("Failed getting release file"
  # three times in 40 s, with apt served a minute before and after): five tries,
  # 15 s to 2 min apart, ~4 min in all.
  log=$cache/debootstrap-$arch.log
  for try in 1 2 3 4 5; do
    rm -rf "$root.tmp" "$root"
    debootstrap --arch="$arch" --variant=minbase --include="$include" "$suite" "$root.tmp" "$mirror" >"$log" 2>&1 && break
    echo "debian-root: debootstrap failed (try $try of 5), see $log" >&2
    tail -n 3 "$log" >&2
    [ "$try" -lt 5 ] || exit 1
    sleep $((15 << (try - 1)))
  done
  # A booted container's getty and resolver have nothing to do here.
  rm -f "$root.tmp/etc/systemd/system/getty.target.wants/"* || true
  echo "nmi-test" >"$root.tmp/etc/hostname"
  : >"$root.tmp/etc/machine-id"
  chroot "$root.tmp" apt-get clean
  touch "$root.tmp/.complete"
  mv "$root.tmp" "$root"
fi
echo "$root"
