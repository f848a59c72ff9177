#!/usr/bin/env bash
# Builds every guest image into guest-images/out/ (cached outside the checkout;
# set VMM_IMAGE_CACHE to choose where). Usage: guest-images/build.sh [IMAGE...]
# where IMAGE is memtest or tiny-linux (default: all).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
images=("$@")
[ ${#images[@]} -gt 0 ] || images=(memtest tiny-linux)
for img in "${images[@]}"; do
    case "$img" in
        memtest | tiny-linux) "$here/$img/build.sh" ;;
        *) echo "guest-images/build.sh: unknown image '$img' (known: memtest, tiny-linux)" >&2; exit 2 ;;
    esac
done
