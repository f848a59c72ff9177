#!/usr/bin/env bash
# Rebuilds resources/triple-fault.elf from triple-fault.S (the ELF is
# committed so the tests need no toolchain for it).
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -c triple-fault.S -o "$work/triple-fault.o"
# -n: no page alignment in the file, so the ELF stays a few hundred bytes.
ld -static -nostdlib -n --build-id=none -z noexecstack --no-warn-rwx-segments -Ttext=0x100000 \
    -o triple-fault.elf "$work/triple-fault.o"
strip triple-fault.elf
