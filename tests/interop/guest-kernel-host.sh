# Guest script (busybox sh, nvme-vm): the Linux kernel NVMe/TCP host against a
# corral target on the host at $NVME_VM_HOST_IP:$PORT.
# env: PORT, NQN, DIGEST ("" | "-g -G"), QUEUES (nr-io-queues), DISCOVER (1/0)
set -u
PORT=${PORT:-4420}
NQN=${NQN:-nqn.2024-01.io.corral:target}
fail() { echo "guest: FAIL: $*"; dmesg | grep -i nvme | tail -20; exit 1; }
if [ "${DISCOVER:-1}" = 1 ]; then
  out=$(nvme discover -t tcp -a "$NVME_VM_HOST_IP" -s "$PORT" 2>&1) || fail "discover: $out"
  echo "$out" | grep -q "subnqn: *$NQN" || fail "discovery log lacks $NQN: $out"
  echo "guest: discover ok"
fi
nvme connect -t tcp -a "$NVME_VM_HOST_IP" -s "$PORT" -n "$NQN" ${DIGEST:-} ${QUEUES:+--nr-io-queues=$QUEUES} || fail "connect"
dev=$(nvme_wait_dev "$NQN" 20) || fail "no namespace device"
echo "guest: connected $dev digest='${DIGEST:-}' queues=${QUEUES:-default}"
# Write a pattern with O_DIRECT at a few offsets and sizes, read back, compare.
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
dd if=/tmp/pat of="$dev" bs=1M count=4 oflag=direct 2>/dev/null || fail "write 1M"
dd if=/tmp/pat of="$dev" bs=4k count=64 seek=2048 oflag=direct 2>/dev/null || fail "write 4k"
dd if=/tmp/pat of="$dev" bs=512 count=7 seek=30001 oflag=direct 2>/dev/null || fail "write 512"
sync
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev" of=/tmp/r1 bs=1M count=4 iflag=direct 2>/dev/null || fail "read 1M"
dd if="$dev" of=/tmp/r2 bs=4k count=64 skip=2048 iflag=direct 2>/dev/null || fail "read 4k"
dd if="$dev" of=/tmp/r3 bs=512 count=7 skip=30001 iflag=direct 2>/dev/null || fail "read 512"
cmp /tmp/pat /tmp/r1 || fail "1M data differs"
head -c 262144 /tmp/pat | cmp - /tmp/r2 || fail "4k data differs"
head -c 3584 /tmp/pat | cmp - /tmp/r3 || fail "512 data differs"
echo "guest: data verified"
if command -v fio >/dev/null 2>&1 && [ "${FIO:-1}" = 1 ]; then
  fio --name=v --filename="$dev" --direct=1 --ioengine=psync --rw=randwrite --bs=4k --size=8M \
      --offset=16M --verify=crc32c --do_verify=1 --numjobs=1 --iodepth=1 >/tmp/fio.log 2>&1 \
      || { cat /tmp/fio.log; fail "fio verify"; }
  echo "guest: fio verify ok"
fi
if [ "${VANISH:-0}" = 1 ]; then
  echo "guest: vanishing without disconnect"
  vm_ready vanish
  vm_wait_host 120
  exit $?
fi
nvme disconnect -n "$NQN" || fail "disconnect"
echo "guest: disconnected"
exit 0
