#!/usr/bin/env bash
# System packages nmi's tests and demo use: rule tools for both iptables
# flavours, nftables (command and library), conntrack, iproute2 for namespaces,
# openssl for test certificates, wrk for the benchmarks, systemd for unit checks,
# clang with its libFuzzer/sanitizer runtime for the native parser fuzzing;
# for the tests under real runtimes: dpkg-dev (dpkg-shlibdeps, for the package),
# debootstrap and systemd-container (a Debian 12 node booted with
# systemd-nspawn), podman with runc (crun refuses hybrid cgroup hosts).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then echo "install-deps: run as root" >&2; exit 2; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  iptables nftables libnftables1 conntrack iproute2 openssl ca-certificates \
  procps wrk systemd clang libclang-rt-14-dev libbpf-dev bpftool \
  dpkg-dev debootstrap systemd-container podman runc
