#!/usr/bin/env bash
# Volumes end to end (issue 5): a 3-replica and a 1-replica volume through the
# NBD frontend against the same lvol exported directly (no engine, no network),
# fio's nbd engine on CPU 1, every corral process on CPU 0; then attach and
# detach latency (median, p99) with 1 volume and with 50 other volumes attached.
#
#   bench/volume.sh [SECONDS per run, default 5] [REPS, default 3] [CYCLES, default 20]
#   env: NO_BUILD=1, DIR (default /work/bench-volume, removed afterwards), LOAD_MAX, LOAD_WAIT,
#        JOBS="4k-randread-1 ..." (a subset of the fio jobs; JOBS=none: latency only)
# Bounded: about 6 jobs x 3 devices x REPS x (SECONDS+2) + 2 x CYCLES attach/detach cycles + setup.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
SECS=${1:-5}
REPS=${2:-3}
CYCLES=${3:-20}
DIR=${DIR:-/work/bench-volume}
need taskset util-linux; need python3 python3; need fio fio; need cargo
need_done
build_corral
up3 127.0.9
q volume create r3 --size 1GiB --replicas 3
q volume create r1 --size 1GiB --replicas 1
q volume attach r3 --node node1
q volume attach r1 --node node1
uri() { "$CORRAL" volume show "$1" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["volume"]["endpoint"])'; }
declare -A URI=([replicas-3]=$(uri r3) [replicas-1]=$(uri r1))
# The direct lvol: same disk, same dataplane (node1), exported without an engine.
SOCK=$DIR/node1/rpc.sock
NBD=$(free_port)
"$CORRAL" rpc -s "$SOCK" bdev_lvol_create '{"lvol_name":"direct","size_in_mib":1024,"thin_provision":true,"lvs_name":"disk0"}' >/dev/null
"$CORRAL" rpc -s "$SOCK" corral_nbd_start "{\"name\":\"direct\",\"bdev_name\":\"disk0/direct\",\"listen_address\":\"127.0.9.1:$NBD\"}" >/dev/null
URI[lvol-direct]=nbd://127.0.9.1:$NBD/direct
DEVICES="lvol-direct replicas-3 replicas-1"
# Fill every device so that reads read data, not holes.
for d in $DEVICES; do
    taskset -c 1 fio --name=fill --ioengine=nbd --uri="${URI[$d]}" --rw=write --bs=1m --iodepth=4 --size=1G >/dev/null
done

echo "## Volumes through the NBD frontend (bench/volume.sh)"
echo
machine
echo "- 3 nodes of \`corral up\` on 127.0.9.1-3 (dataplanes, agents, manager pinned to CPU 0); volumes of 1 GiB attached on node1 over NBD; lvol-direct is an lvol on node1's disk exported by node1's dataplane without an engine."
echo "- fio on CPU 1: \`fio --ioengine=nbd --uri=URI --rw=RW --bs=BS --iodepth=QD --time_based --runtime=$SECS --ramp_time=1\`, median of $REPS runs, IOPS range in brackets."
echo
echo "| job | device | IOPS [range] | MiB/s | mean µs | p99 µs | vs lvol-direct | load |"
echo "|---|---|---|---|---|---|---|---|"
declare -A MED
while read -r name rw bs qd; do
    if [ -n "${JOBS:-}" ] && [[ " $JOBS " != *" $name "* ]]; then continue; fi
    for d in $DEVICES; do
        : >"$DIR/runs"
        for r in $(seq "$REPS"); do
            load=$(wait_quiet)
            taskset -c 1 fio --name=j --ioengine=nbd --uri="${URI[$d]}" --rw="$rw" --bs="$bs" --iodepth="$qd" \
                --time_based --runtime="$SECS" --ramp_time=1 --output-format=json >"$DIR/j" 2>/dev/null || continue
            python3 - "$DIR/j" "$load" >>"$DIR/runs" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
p99 = d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
print(f'{d["iops"]:.0f} {d["bw_bytes"]/1048576:.1f} {d["lat_ns"]["mean"]/1000:.1f} {p99:.1f} {sys.argv[2]}')
PY
        done
        n=$(wc -l <"$DIR/runs"); [ "$n" -gt 0 ] || { echo "| $name | $d | failed ||||||"; continue; }
        row=$(sort -g "$DIR/runs" | sed -n "$(( (n + 1) / 2 ))p")
        lo=$(sort -g "$DIR/runs" | head -1 | cut -d' ' -f1); hi=$(sort -g "$DIR/runs" | tail -1 | cut -d' ' -f1)
        set -- $row
        MED[$name/$d]=$1
        ratio=$(awk -v a="$1" -v b="${MED[$name/lvol-direct]:-0}" 'BEGIN{ if (b>0) printf "%.2f×", a/b; else print "-"}')
        echo "| $name | $d | $1 [$lo–$hi] | $2 | $3 | $4 | $ratio | $5 |"
    done
done <<'JOBS'
4k-randread-1 randread 4k 1
4k-randread-32 randread 4k 32
4k-randwrite-1 randwrite 4k 1
4k-randwrite-32 randwrite 4k 32
128k-read-16 read 128k 16
128k-write-16 write 128k 16
JOBS
echo

# Attach / detach latency: CLI wall clock of `corral volume attach|detach` (which
# wait until the manager reports attached / detached).
lat() { # lat VOLUME -> "attach_ms detach_ms" per cycle on stdout
    for c in $(seq "$CYCLES"); do
        a0=$(date +%s%N); q volume attach "$1" --node node2; a1=$(date +%s%N)
        q volume detach "$1"; d1=$(date +%s%N)
        echo "$(( (a1 - a0) / 1000000 )) $(( (d1 - a1) / 1000000 ))"
    done
}
stats() { python3 -c 'import sys,statistics as s; v=sorted(float(x) for x in sys.argv[1:]); p=lambda q: v[min(len(v)-1,int(round(q*(len(v)-1))))]; print(f"{s.median(v):.0f} | {p(0.99):.0f}")' "$@"; }
q volume detach r3; q volume detach r1
q volume create solo --size 64MiB --replicas 3
lat solo >"$DIR/lat1"
for i in $(seq -w 1 50); do q volume create "bg$i" --size 16MiB --replicas 1; q volume attach "bg$i" --node node2 --no-wait; done
for i in $(seq 300); do n=$("$CORRAL" volume ls -o json | python3 -c 'import json,sys; print(sum(1 for v in json.load(sys.stdin) if v["state"]=="attached"))'); [ "$n" -ge 50 ] && break; sleep 0.5; done
lat solo >"$DIR/lat50"
echo "### Attach and detach latency (\`corral volume attach|detach\` wall clock, $CYCLES cycles, a 3-replica volume on node2)"
echo
echo "| other volumes attached | attach median ms | attach p99 ms | detach median ms | detach p99 ms |"
echo "|---|---|---|---|---|"
echo "| 0 | $(stats $(cut -d' ' -f1 "$DIR/lat1")) | $(stats $(cut -d' ' -f2 "$DIR/lat1")) |"
echo "| 50 | $(stats $(cut -d' ' -f1 "$DIR/lat50")) | $(stats $(cut -d' ' -f2 "$DIR/lat50")) |"
