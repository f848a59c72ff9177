# Shared helpers for the guest image build scripts. Source it; do not run it.
#
# Every image is built into a cache directory outside the checkout, keyed by a
# hash of everything that goes into it, then linked under guest-images/out/.
# A cache miss simply rebuilds; a hit costs nothing.

set -euo pipefail

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="$IMAGES_DIR/out"
CACHE_ROOT="${VMM_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm-guest-images}"

log() { printf '[guest-images] %s\n' "$*" >&2; }

# apt_need PKG...: install the Debian packages that are missing (needs root).
apt_need() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        log "error: need root to install ${missing[*]} (or install them yourself)"
        return 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# inputs_hash PATH...: a stable hash over the contents and names of files,
# by their paths relative to guest-images/ (so every checkout agrees).
inputs_hash() {
    local f
    find "$@" -type f -not -path "$OUT_DIR/*" -print0 | LC_ALL=C sort -z |
        while IFS= read -r -d '' f; do
            printf '%s %s\n' "$(realpath --relative-to="$IMAGES_DIR" "$f")" "$(sha256sum < "$f" | cut -c1-64)"
        done | sha256sum | cut -c1-16
}

# cached_build NAME KEY BUILDER: run `BUILDER DIR` into a fresh cache directory
# unless NAME-KEY is already cached, then link it as out/NAME.
cached_build() {
    local name=$1 key=$2 builder=$3
    local dir="$CACHE_ROOT/$name-$key"
    if [ -e "$dir/.complete" ]; then
        log "$name: cached ($dir)"
    else
        log "$name: building into $dir"
        rm -rf "$dir" "$dir.tmp"
        mkdir -p "$dir.tmp"
        "$builder" "$dir.tmp"
        touch "$dir.tmp/.complete"
        mv "$dir.tmp" "$dir"
    fi
    mkdir -p "$OUT_DIR"
    rm -rf "${OUT_DIR:?}/$name"
    # An image that is one file (DIR/NAME) is linked as that file, else the directory.
    if [ -f "$dir/$name" ]; then
        ln -s "$dir/$name" "$OUT_DIR/$name"
    else
        ln -s "$dir" "$OUT_DIR/$name"
    fi
}
