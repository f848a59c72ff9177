#!/usr/bin/env bash
# Rebuilds resources/triple-fault.elf from triple-fault.S (the ELF is
# committed so the tests need no toolchain for it).
set -euo pipefail
cd "$(dirname "$0")"
gcc -c triple-fault.S -o /tmp/triple-fault.o
ld -static -nostdlib --build-id=none -z noexecstack --no-warn-rwx-segments -Ttext=0x100000 -o triple-fault.elf /tmp/triple-fault.o
rm -f /tmp/triple-fault.o
