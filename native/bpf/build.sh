#!/bin/sh
# Compiles the eBPF programs (binding.gyp's action): build.sh <source> <object>.
# -g keeps the BTF that libbpf needs for the maps' definitions.
set -e
exec clang -O2 -g -Wall -target bpf -I"/usr/include/$(${CC:-gcc} -print-multiarch)" -c "$1" -o "$2"
