#!/usr/bin/env bash
# corral's NVMe/TCP host against the Linux kernel's nvmet target, in the nvme-vm.
#
# Boots the VM with a RAM disk exported over nvmet-tcp, forwards a local port to
# it, and runs the (otherwise ignored) host_kernel tests against it: connect with
# and without digests, 1 and 2 I/O queues, verified random I/O 512 B..1 MiB,
# flush / write zeroes / deallocate, a cut connection recovered by reconnect,
# controller loss, a directly driven qpair, disconnect. Exits non-zero on failure.
#
# Usage: tests/interop/host-vs-kernel.sh [extra cargo test args]
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
vm=${NVME_VM:-$here/../shared/tools/nvme-vm/nvme-vm.sh}
[ -x "$vm" ] || vm=$here/../shared/tools/nvme-vm/nvme-vm.sh
port=${HOST_PORT:-$((20000 + RANDOM % 20000))}
cd "$here"
"$vm" setup >/dev/null
# Build first so that the VM does not wait for the compiler.
profile=${CORRAL_PROFILE:-release}
cargo test --profile "$profile" -p nvmf --test host_kernel --no-run 2>&1 | tail -2
bin=$(cargo test --profile "$profile" -p nvmf --test host_kernel --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*host_kernel[^"]*\)".*/\1/p' | tail -1)
[ -x "$bin" ] || { echo "host-vs-kernel: test binary not found" >&2; exit 1; }
guest=$(dirname "$vm")/examples/guest-target-for-host.sh
exec "$vm" run -t "${VM_TIMEOUT:-300}" -f "tcp:127.0.0.1:${port}-:4420" \
  -H "NVMF_KERNEL_TARGET=127.0.0.1:${port} $bin --ignored --test-threads=1 --nocapture $*" \
  "$guest"
