#!/bin/sh
# binding.gyp asks: can this machine build the eBPF backend? (clang targeting
# bpf, and libbpf's headers and library).
# Prints 1 or 0; without it the addon builds without eBPF support. With it
# the addon links libbpf.so.1 (Debian's libbpf.a is not position-independent).
multiarch=$(gcc -print-multiarch 2>/dev/null)
command -v clang >/dev/null 2>&1 || { echo 0; exit 0; }
[ -f /usr/include/bpf/libbpf.h ] || { echo 0; exit 0; }
for lib in libbpf.so; do
  [ -e "/usr/lib/$multiarch/$lib" ] || [ -e "/usr/lib/$lib" ] || { echo 0; exit 0; }
done
echo 1
