#!/usr/bin/env bash
# Regenerates docs/images/training_curves.svg, the picture of a run shown in the README: a short run
# of the main job (`pinterest-homefeed` on the built-in synthetic data) drawn by the trainer itself.
#
# Usage: scripts/readme-curves.sh
#   ROWS=6144  EPOCHS=3  BATCH=256  LOG_EVERY=2  SEED=0  PROFILE=release
#
# The run is shorter than the README's main job (6144 instead of 20000 synthetic rows, so 24 steps
# per epoch, logged every 2 steps) to keep the image small and the script quick; everything else is
# the main job's defaults. The run directory is temporary; only the SVG is kept.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
run="$(mktemp -d)"
trap 'rm -rf "$run"' EXIT

cargo run --quiet --profile "${PROFILE:-release}" -- train \
  --preset pinterest-homefeed --out "$run/homefeed" \
  --synthetic-rows "${ROWS:-6144}" --epochs "${EPOCHS:-3}" --batch-size "${BATCH:-256}" \
  --log-every "${LOG_EVERY:-2}" --seed "${SEED:-0}" --quiet
mkdir -p docs/images
cp "$run/homefeed/training_curves.svg" docs/images/training_curves.svg
echo "wrote docs/images/training_curves.svg ($(wc -c < docs/images/training_curves.svg) bytes)"
