#!/usr/bin/env bash
# The Linux kernel NVMe/TCP host (in a VM) against corral's target:
# discover, connect with/without digests and with 1 and 2 I/O queues, verified
# I/O, disconnect, and a host that vanishes (VM frozen) being dropped after the
# keep-alive timeout. Needs ../shared/tools/nvme-vm (setup is run here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
vm=${NVME_VM:-$root/../shared/tools/nvme-vm/nvme-vm.sh}
corral=${CORRAL_BIN:-$root/target/release/corral}
port=${PORT:-14420}
"$vm" setup --with-fio >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fails=0

run_case() { # name, vm args...
  local name=$1; shift
  echo "=== kernel host vs corral target: $name"
  if "$vm" run -q -t 150 "$@" "$here/guest-kernel-host.sh" > "$work/$name.out" 2>&1; then
    grep '^guest:' "$work/$name.out" | sed 's/^/    /'
    echo "--- PASS $name"
  else
    echo "--- FAIL $name"; sed 's/^/    /' "$work/$name.out" | tail -40
    fails=$((fails + 1))
  fi
}

bg="$corral target --listen 127.0.0.1:$port --malloc-mib 64"
run_case plain -B "$bg" -e PORT=$port
run_case digests-2q -c 2 -B "$bg" -e PORT=$port -e "DIGEST=-g -G" -e QUEUES=2 -e DISCOVER=0
run_case 1q -B "$bg" -e PORT=$port -e QUEUES=1 -e DISCOVER=0 -e FIO=0

# Vanishing host: freeze the VM once it is connected; the target must drop the
# controller within the keep-alive timeout (the kernel asks kato 5 s) even though
# the TCP connection stays open.
log="$work/target.log"
hostcmd="qpid=\$(pgrep -n -f '^(/usr/bin/)?qemu-system'); \
  kill -STOP \$qpid; t0=\$(date +%s); ok=1; \
  for i in \$(seq 1 100); do grep -q 'due to keep alive timeout' $log && { ok=0; break; }; sleep 0.2; done; \
  t1=\$(date +%s); echo \"keep-alive drop after \$((t1-t0)) s (rc \$ok)\"; \
  grep -q 'controller destroyed.*corral:target' $log || ok=1; \
  kill -CONT \$qpid; exit \$ok"
run_case vanish -B "$bg 2>$log" -e PORT=$port -e DISCOVER=0 -e FIO=0 -e VANISH=1 -H "$hostcmd"
grep -h 'keep-alive drop' "$work"/vanish.out | sed 's/^/    /' || true

[ "$fails" = 0 ] && echo "kernel-host interop: all passed" || { echo "kernel-host interop: $fails failed"; exit 1; }
