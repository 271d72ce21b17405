#!/usr/bin/env bash
# Fetches MovieLens-100k as shipped in the recbole 1.2.1 wheel into data/ml-100k/ (git-ignored).
# The data's licence forbids redistribution: never commit it. Needs `pip` and `unzip` (or python3).
# Usage: scripts/fetch-movielens.sh [DEST]   (default: data/ml-100k under the repository root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/data/ml-100k}"
if [[ -s "$dest/ml-100k.inter" && -s "$dest/ml-100k.user" && -s "$dest/ml-100k.item" ]]; then
    echo "MovieLens-100k already in $dest"
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

pip download --quiet --no-deps --dest "$tmp" recbole==1.2.1
wheel="$(ls "$tmp"/recbole-1.2.1-*.whl)"
mkdir -p "$dest"
if command -v unzip >/dev/null; then
    unzip -q -o -j "$wheel" 'recbole/dataset_example/ml-100k/*' -d "$dest"
else
    python3 - "$wheel" "$dest" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("recbole/dataset_example/ml-100k/") and not name.endswith("/"):
            with open(os.path.join(dest, os.path.basename(name)), "wb") as out:
                out.write(z.read(name))
PY
fi
for f in ml-100k.inter ml-100k.user ml-100k.item; do
    [[ -s "$dest/$f" ]] || { echo "error: $f missing from the recbole wheel" >&2; exit 1; }
done
echo "MovieLens-100k in $dest: $(($(wc -l < "$dest/ml-100k.inter") - 1)) ratings"
