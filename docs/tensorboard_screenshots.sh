#!/usr/bin/env bash
# The docs' TensorBoard screenshots, from real runs and a real TensorBoard in headless Chromium.
#   bash docs/tensorboard_screenshots.sh [WORK_DIR]
# Trains and evaluates three digits runs that differ in one override each (attack.eps=0.1, so that the
# perturbations show on 8x8 images), serves them with TensorBoard, and writes docs/tensorboard_*.png.
# Needs Chromium (Debian: apt-get install chromium) and Node.js with npm (playwright-core is installed in WORK_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
runs="$work/runs"
mkdir -p "$runs"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
common=(engine=inline evaluate=true attack.eps=0.1 train.progress=false "attack.cache_dir=$work/cache")
for spec in "default:" "lr0.01:optimizer.lr=0.01" "iid:deployment=distributed_iid"; do
    name="${spec%%:*}"
    extra="${spec#*:}"
    [ -f "$runs/$name/results.json" ] && grep -q robust_accuracy "$runs/$name/results.json" && continue
    rm -rf "${runs:?}/$name"
    .venv/bin/fedrobust train "${common[@]}" ${extra:+"$extra"} "run_dir=$runs/$name" > "$work/$name.log" 2>&1
done

port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/tensorboard --logdir "$runs" --host 127.0.0.1 --port "$port" > "$work/tensorboard.log" 2>&1 &
tb=$!
trap 'kill "$tb" 2>/dev/null || true' EXIT
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$port/data/runs" > /dev/null && break
    sleep 1
done

[ -d "$work/node/node_modules/playwright-core" ] || npm install --silent --prefix "$work/node" playwright-core@1
NODE_PATH="$work/node/node_modules" node docs/tensorboard_screenshots.cjs "http://127.0.0.1:$port" docs
echo "screenshots: docs/tensorboard_hparams.png docs/tensorboard_images.png (runs in $runs)"
