#!/usr/bin/env bash
# Makes the base deploy/Containerfile expects, here, with no registry: the
# Debian 12 root of scripts/debian-root.sh (debootstrap minbase with iptables,
# nftables, libnftables1, conntrack, iproute2; built once, cached) imported into
# podman. Prints the tag, localhost/nmi-base:bookworm (-arm64 for arm64) unless
# given one:
#   bash deploy/base-image.sh [--arch arm64] [TAG]
# An arm64 base is for `podman build --platform linux/arm64` on this machine, whose
# RUN steps qemu runs (binfmt_misc, as scripts/install-deps.sh sets up).
# Nothing to do when TAG already holds an import of that same root; a changed
# root is imported again and the old image dropped.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then echo "base-image: run as root" >&2; exit 2; fi
cd "$(dirname "$0")/.."
host=$(dpkg --print-architecture) arch=$host
if [ "${1:-}" = --arch ]; then arch=${2:-}; shift $(($# < 2 ? 1 : 2)); fi
case $arch in
  "$host") suffix= ;;
  arm64) suffix=-arm64 ;;
  *) echo "base-image: --arch is $host or arm64, not ${arch:-nothing}" >&2; exit 2 ;;
esac
tag=${1:-localhost/nmi-base:bookworm$suffix}
root=$(bash scripts/debian-root.sh "$arch")
# The path carries debian-root.sh's key (suite, packages, architecture); the
# time it was completed tells apart a root rebuilt at the same path.
source="$root@$(stat -c %Y "$root/.complete")"
# Parallel test runs import once, not once each.
exec 9>"/run/lock/nmi-base-image$suffix.lock"
flock 9
old=$(podman image inspect --format '{{.Id}} {{index .Config.Labels "nmi.base.source"}}' "$tag" 2>/dev/null || true)
if [ "${old#* }" != "$source" ]; then
  # Manual pages, info pages, translations and apt's package lists: nothing in
  # the image reads them (it installs nmi with dpkg alone), 90 of its 218 MB.
  tar -C "$root" -c --numeric-owner --exclude=./.complete \
    --exclude='./usr/share/man/*' --exclude='./usr/share/info/*' --exclude='./usr/share/locale/*' \
    --exclude='./var/lib/apt/lists/*' --exclude='./var/cache/apt/*' . \
    | podman import --quiet --arch "$arch" --change "LABEL nmi.base.source=$source" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
  # The image the tag held before, unless something still uses it.
  [ -z "$old" ] || podman rmi "${old%% *}" >/dev/null 2>&1 || true
fi
echo "$tag"
