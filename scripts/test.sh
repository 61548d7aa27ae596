#!/usr/bin/env bash
# corral's whole test suite: formatting, lints, unit/property/integration tests
# (real processes, real sockets, real clients), and interoperability with the
# Linux kernel's NVMe/TCP host and target in a small VM.
# Usage: scripts/test.sh [--quick]   (--quick skips the VM interop stage)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0; [ "${1:-}" = "--quick" ] && quick=1
# The profile tests build with (Cargo.toml: [profile.ci]); the interop scripts
# and the control tests use the corral binary of the same build.
export CORRAL_PROFILE=${CORRAL_PROFILE:-ci}
export CORRAL_BIN=${CORRAL_BIN:-$PWD/target/$CORRAL_PROFILE/corral}
t0=$(date +%s)
stage() { echo; echo "==== $* ($(( $(date +%s) - t0 )) s)"; }

stage "dependencies"
bash scripts/deps.sh

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

stage "build (profile $CORRAL_PROFILE, shared by every stage below)"
cargo build --workspace --profile "$CORRAL_PROFILE" --bins --tests

stage "cargo test (unit, property, integration)"
cargo test --workspace --profile "$CORRAL_PROFILE" -- --test-threads="${TEST_THREADS:-2}"

if [ "$quick" = 0 ]; then
  nvme_vm=../shared/tools/nvme-vm/nvme-vm.sh
  if [ -x "$nvme_vm" ]; then
    stage "interop: Linux kernel host vs corral target"
    bash tests/interop/kernel-host.sh
    if [ -f tests/interop/host-vs-kernel.sh ]; then
      stage "interop: corral host vs Linux kernel target"
      bash tests/interop/host-vs-kernel.sh
    fi
  else
    echo "interop stage skipped: $nvme_vm not found (it lives in ../shared beside the checkout)"
    [ "${CI:-}" = true ] && exit 1
  fi
fi
stage "all tests passed"
