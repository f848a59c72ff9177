#!/usr/bin/env bash
# Builds memtest, our memory-checking guest, into guest-images/out/memtest.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib.sh"

apt_need gcc binutils

build_memtest() {
    local out=$1 work
    work=$(mktemp -d)
    local cflags=(-O2 -ffreestanding -fno-stack-protector -fno-pic -fno-pie -mno-red-zone
        -mgeneral-regs-only -fno-asynchronous-unwind-tables -fno-builtin -fno-tree-loop-distribute-patterns -nostdlib -Wall -Wextra -Werror)
    gcc "${cflags[@]}" -c "$here/entry.S" -o "$work/entry.o"
    for c in memtest virtio net vsock balloon; do
        gcc "${cflags[@]}" -c "$here/$c.c" -o "$work/$c.o"
    done
    ld -static -nostdlib --no-dynamic-linker -z noexecstack -z max-page-size=4096 --build-id=none --no-warn-rwx-segments \
        -T "$here/memtest.ld" -o "$out/memtest" "$work/entry.o" "$work/memtest.o" "$work/virtio.o" "$work/net.o" "$work/vsock.o" "$work/balloon.o"
    rm -rf "$work"
}

key=$( (inputs_hash "$here" "$here/../lib.sh"; gcc --version | head -1; ld --version | head -1) | sha256sum | cut -c1-16)
cached_build memtest "$key" build_memtest
