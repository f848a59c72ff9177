#!/usr/bin/env bash
# Builds tiny-linux: vmlinux from Debian's linux-source-6.1 (tinyconfig plus
# config.fragment, patches/ applied) and an initramfs with our static init.
# Output: guest-images/out/tiny-linux/{vmlinux,initramfs.cpio.gz}.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../lib.sh"

apt_need linux-source-6.1 flex bison libelf-dev bc cpio libssl-dev gcc make xz-utils

build_tiny_linux() {
    local out=$1
    local src_tar=/usr/src/linux-source-6.1.tar.xz
    local work jobs
    jobs=$(nproc)
    [ "$jobs" -le 2 ] || jobs=2 # the build hosts have 2 cores, shared with other work
    work=$(mktemp -d "$CACHE_ROOT/tiny-linux-work.XXXXXX")
    # The source tree is about 1.5 GB: never leave it behind, even on failure.
    # shellcheck disable=SC2064 # expand $work now
    trap "rm -rf '$work'" EXIT
    log "tiny-linux: extracting $src_tar"
    tar -xf "$src_tar" -C "$work"
    local tree="$work/linux-source-6.1"
    for p in "$here"/patches/*.patch; do
        log "tiny-linux: applying $(basename "$p")"
        patch -p1 -d "$tree" --quiet --fuzz=0 --forward < "$p" ||
            { log "error: $(basename "$p") does not apply to $src_tar"; return 1; }
    done
    make -C "$tree" -s tinyconfig >/dev/null # merge_config.sh lists every override
    (cd "$tree" && scripts/kconfig/merge_config.sh -m .config "$here/config.fragment" >/dev/null)
    make -C "$tree" -s olddefconfig
    # Every option we asked for must have survived dependency resolution.
    local missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=n) grep -qx "${line%=n}=y" "$tree/.config" && { log "error: ${line%=n} is still set"; missing=1; } ;;
            CONFIG_*) grep -qx "$line" "$tree/.config" || { log "error: $line did not stick"; missing=1; } ;;
        esac
    done < "$here/config.fragment"
    [ "$missing" -eq 0 ] || return 1
    log "tiny-linux: building vmlinux (a few minutes)"
    make -C "$tree" -s -j"$jobs" vmlinux
    cp "$tree/vmlinux" "$out/vmlinux"

    gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -O2 -Wall -Wextra \
        -o "$work/init" "$here/init.c"
    sed "s|INIT|$work/init|" "$here/initramfs.list" > "$work/initramfs.list"
    make -C "$tree" -s usr/gen_init_cpio
    "$tree/usr/gen_init_cpio" "$work/initramfs.list" | gzip -9 > "$out/initramfs.cpio.gz"
    rm -rf "$work"
    trap - EXIT
    log "tiny-linux: vmlinux $(stat -c %s "$out/vmlinux") bytes, initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes"
}

key=$( (inputs_hash "$here" "$here/../lib.sh"; dpkg-query -W -f='${Version}' linux-source-6.1) | sha256sum | cut -c1-16)
cached_build tiny-linux "$key" build_tiny_linux
