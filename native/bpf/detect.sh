#!/bin/sh
# binding.gyp asks: can this machine build the eBPF backend? (clang targeting
# bpf, and libbpf's headers and library). Prints 1 or 0; with 0 the addon
# builds without eBPF support and `--rules ebpf` says so. With 1 the addon
# links libbpf.so.1 (Debian's libbpf.a is not position-independent).
# NMI_BUILD_BPF=0 builds without it even where it could be built.
[ "${NMI_BUILD_BPF:-1}" = 0 ] && { echo 0; exit 0; }
command -v clang >/dev/null 2>&1 || { echo 0; exit 0; }
[ -f /usr/include/bpf/libbpf.h ] || { echo 0; exit 0; }
multiarch=$(${CC:-gcc} -print-multiarch 2>/dev/null)
[ -e "/usr/lib/$multiarch/libbpf.so" ] || [ -e /usr/lib/libbpf.so ] || { echo 0; exit 0; }
echo 1
