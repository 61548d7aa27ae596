#!/usr/bin/env bash
# corral's main job on a fresh machine: install what is needed, build, and run a
# three-node cluster on loopback with a replicated volume attached over NBD.
# Stays in the foreground; Ctrl-C stops everything. Data lives in ./data
# (re-running reuses it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p corral
exec target/release/corral up --data-dir "${CORRAL_DATA_DIR:-./data}" --nodes "${CORRAL_NODES:-3}" "$@"
