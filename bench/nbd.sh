#!/usr/bin/env bash
# NBD: fio's nbd engine (pinned to CPU 1) against NBD servers (pinned to CPU 0),
# every server on every job side by side in one run.
#
#   bench/nbd.sh [SECONDS per run, default 5] [REPS, default 3]
#   env: SERVERS (default "corral-malloc nbdkit-memory corral-file qemu-nbd-file"),
#        JOBS (subset of the job names below), DIR (file directory, default
#        /work/bench-nbd, removed afterwards), NO_BUILD=1, LOAD_MAX, LOAD_WAIT,
#        TITLE (table heading)
#
# Servers:
#   corral-malloc      corral dataplane: bdev_malloc_create (1 GiB, 512 B blocks) + corral_nbd_start
#   nbdkit-memory      nbdkit memory 1G
#   corral-file        corral dataplane: bdev_aio_create on DIR/disk.img (1 GiB, sparse)
#   qemu-nbd-file      qemu-nbd --cache=none --aio=io_uring on the same DIR/disk.img
#   corral-raid1x1     raid1 of 1 malloc bdev;   corral-raid1x3   raid1 of 3 malloc bdevs
#   corral-nvme        one NVMe bdev attached from a `corral target` (malloc) over loopback
#   corral-raid1x3-nvme  raid1 of 3 NVMe bdevs, from 3 `corral target`s
#   corral-lvolN       an lvol head (lvstore on DIR, 1 GiB) with N snapshots under it (N = 0, 10, 100):
#                      the volume is written in full in N+1 slices with a snapshot after each
#                      but the last, so reads find their data in every layer of the chain
#   qemu-nbd-lvfile    qemu-nbd --cache=none --aio=io_uring on a 1 GiB file in DIR, written in full
#   fio-direct         no server: fio io_uring O_DIRECT on a 1 GiB file in DIR laid out by fio (the ceiling)
# Every corral server runs in one `corral dataplane --cpumask 0x1`; the corral
# targets behind the NVMe bdevs are pinned to CPU 0 too.
# Bounded: about (jobs x servers x REPS x (SECONDS+2+load wait)) seconds plus setup.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
SECS=${1:-5}
REPS=${2:-3}
SERVERS=${SERVERS:-corral-malloc nbdkit-memory corral-file qemu-nbd-file}
DIR=${DIR:-/work/bench-nbd}
need taskset util-linux; need python3 python3; need fio fio; need cargo
[[ " $SERVERS " == *" nbdkit-"* ]] && need nbdkit nbdkit
[[ " $SERVERS " == *" qemu-nbd"* ]] && need qemu-nbd qemu-utils
[[ " $SERVERS " == *" corral-lvol"* ]] && need qemu-io qemu-utils
need_done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "missing: fio built with the nbd engine"; exit 2; }
build_corral

# name rw bs iodepth
ALL_JOBS="4k-randread-1 randread 4k 1
4k-randread-32 randread 4k 32
4k-randwrite-1 randwrite 4k 1
4k-randwrite-32 randwrite 4k 32
128k-read-16 read 128k 16
128k-write-16 write 128k 16"

out=$(mktemp -d)
rm -rf "$DIR"; mkdir -p "$DIR"
trap 'cleanup; rm -rf "$DIR" "$out"' EXIT INT TERM
SOCK=$out/dp.sock
declare -A URI SPID
DP=""

dataplane() {
    [ -n "$DP" ] && return
    taskset -c 0 "$CORRAL" dataplane --rpc-socket "$SOCK" --state-dir "$out/state" --cpumask 0x1 \
        >"$out/dp.log" 2>&1 &
    DP=$!; PIDS+=("$DP")
    for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
    [ -S "$SOCK" ] || { echo "corral dataplane did not start:"; tail "$out/dp.log"; exit 1; }
}
rpc() { "$CORRAL" rpc -s "$SOCK" "$@" >/dev/null; }
export_bdev() { # export_bdev SERVER BDEV
    local p; p=$(free_port)
    rpc corral_nbd_start "{\"name\":\"$2\",\"bdev_name\":\"$2\",\"listen_address\":\"127.0.0.1:$p\"}"
    URI[$1]="nbd://127.0.0.1:$p/$2"; SPID[$1]=$DP
}
malloc() { rpc bdev_malloc_create "{\"name\":\"$1\",\"num_blocks\":2097152,\"block_size\":512}"; }
target() { # target NAME: a corral target pinned to CPU 0, attached as NVMe bdev NAME (NAMEn1)
    taskset -c 0 "$CORRAL" target --malloc-mib 1024 --listen 127.0.0.1:0 --print-ready >"$out/$1.out" 2>"$out/$1.err" &
    local pid=$!; PIDS+=("$pid")
    for _ in $(seq 100); do grep -q '^ready' "$out/$1.out" 2>/dev/null && break; sleep 0.1; done
    pin_all "$pid" 0
    local port; port=$(sed -n 's/^ready .*:\([0-9]*\)$/\1/p' "$out/$1.out")
    rpc bdev_nvme_attach_controller "{\"name\":\"$1\",\"trtype\":\"tcp\",\"adrfam\":\"ipv4\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$port\",\"subnqn\":\"nqn.2024-01.io.corral:target\"}"
}
external() { # external SERVER PORT CMD...: a non-corral server pinned to CPU 0
    local s=$1 p=$2; shift 2
    taskset -c 0 "$@" >"$out/$s.log" 2>&1 &
    SPID[$s]=$!; PIDS+=("${SPID[$s]}")
    wait_port "$p" 10 || { echo "$s did not start:"; tail "$out/$s.log"; exit 1; }
    pin_all "${SPID[$s]}" 0
    URI[$s]="nbd://127.0.0.1:$p/"
}
lvstore() {
    [ -d "$DIR/lvs" ] && return
    mkdir -p "$DIR/lvs"
    rpc bdev_lvol_create_lvstore "{\"bdev_name\":\"$DIR/lvs\",\"lvs_name\":\"lvs\"}"
}

start() {
    local s=$1 p
    case $s in
        corral-malloc) dataplane; malloc m; export_bdev "$s" m ;;
        corral-file|qemu-nbd-file)
            [ -f "$DIR/disk.img" ] || truncate -s 1G "$DIR/disk.img"
            if [ "$s" = corral-file ]; then
                dataplane; rpc bdev_aio_create "{\"name\":\"f\",\"filename\":\"$DIR/disk.img\",\"block_size\":512}"
                export_bdev "$s" f
            else
                p=$(free_port)
                external "$s" "$p" qemu-nbd -f raw --cache=none --aio=io_uring -b 127.0.0.1 -p "$p" -t "$DIR/disk.img"
            fi ;;
        nbdkit-memory) p=$(free_port); external "$s" "$p" nbdkit -f -i 127.0.0.1 -p "$p" memory 1G ;;
        corral-raid1x1) dataplane; malloc r1a
            rpc bdev_raid_create '{"name":"r1","raid_level":"raid1","strip_size_kb":0,"base_bdevs":["r1a"]}'
            export_bdev "$s" r1 ;;
        corral-raid1x3) dataplane; malloc r3a; malloc r3b; malloc r3c
            rpc bdev_raid_create '{"name":"r3","raid_level":"raid1","strip_size_kb":0,"base_bdevs":["r3a","r3b","r3c"]}'
            export_bdev "$s" r3 ;;
        corral-nvme) dataplane; target nv0; export_bdev "$s" nv0n1 ;;
        corral-raid1x3-nvme) dataplane; target nva; target nvb; target nvc
            rpc bdev_raid_create '{"name":"rn","raid_level":"raid1","strip_size_kb":0,"base_bdevs":["nvan1","nvbn1","nvcn1"]}'
            export_bdev "$s" rn ;;
        corral-lvol*)
            local n=${s#corral-lvol} i
            dataplane; lvstore
            rpc bdev_lvol_create "{\"lvol_name\":\"lv$n\",\"size_in_mib\":1024,\"lvs_name\":\"lvs\",\"thin_provision\":true}"
            export_bdev "$s" "lvs/lv$n"
            # The whole volume is written, in N+1 slices: slice i, then a snapshot,
            # so that reads find their data in every layer of the chain.
            local slice=$(( 1024 / (n + 1) )) off=0 cmds
            for i in $(seq 0 "$n"); do
                [ "$i" -eq "$n" ] && slice=$(( 1024 - off ))
                cmds=(); local o
                for ((o = off; o < off + slice; o += 8)); do
                    cmds+=(-c "write -P $(( (i % 250) + 1 )) ${o}M $(( off + slice - o < 8 ? off + slice - o : 8 ))M")
                done
                timeout 120 qemu-io -f raw "${cmds[@]}" "${URI[$s]}" >/dev/null
                off=$((off + slice))
                if [ "$i" -lt "$n" ]; then
                    rpc bdev_lvol_snapshot "{\"lvol_name\":\"lvs/lv$n\",\"snapshot_name\":\"lv$n-s$i\"}"
                fi
            done ;;
        qemu-nbd-lvfile) # written in full, like the lvol volumes
            dd if=/dev/zero of="$DIR/lvfile.img" bs=8M count=128 oflag=direct status=none; p=$(free_port)
            external "$s" "$p" qemu-nbd -f raw --cache=none --aio=io_uring -b 127.0.0.1 -p "$p" -t "$DIR/lvfile.img" ;;
        fio-direct) ;; # fio lays the file out (writes it in full) on its first run
        *) echo "unknown server $s"; exit 2 ;;
    esac
}
for s in $SERVERS; do start "$s"; done

echo "### ${TITLE:-NBD: fio --ioengine=nbd against NBD servers}"
echo
machine
echo "- servers pinned to CPU 0 (\`corral dataplane --cpumask 0x1\`, \`taskset -c 0\` for the others); fio pinned to CPU 1:"
echo "  \`taskset -c 1 fio --ioengine=nbd --uri=URI --rw=RW --bs=BS --iodepth=QD --time_based --runtime=$SECS --ramp_time=1\`"
echo "- $REPS runs of ${SECS}s per row, median run shown, IOPS range of all runs in brackets; jobs run in the order below for every server (reads of a fresh file read holes)."
echo

fio_run() { # fio_run SERVER RW BS QD -> json on stdout
    local s=$1
    if [ "$s" = fio-direct ]; then
        taskset -c 1 fio --name=j --ioengine=io_uring --direct=1 --filename="$DIR/fio.file" --size=1G \
            --rw="$2" --bs="$3" --iodepth="$4" --time_based --runtime="$SECS" --ramp_time=1 --output-format=json
    else
        taskset -c 1 fio --name=j --ioengine=nbd --uri="${URI[$s]}" \
            --rw="$2" --bs="$3" --iodepth="$4" --time_based --runtime="$SECS" --ramp_time=1 --output-format=json
    fi
}

declare -A MED
rows=()
while read -r name rw bs qd; do
    if [ -n "${JOBS:-}" ] && [[ " $JOBS " != *" $name "* ]]; then continue; fi
    for s in $SERVERS; do
        : >"$out/runs"
        for r in $(seq "$REPS"); do
            load=$(wait_quiet)
            pid=${SPID[$s]:-}
            c0=0; [ -n "$pid" ] && c0=$(cpu_ticks "$pid"); t0=$(date +%s.%N)
            if ! timeout $((SECS + 60)) bash -c "$(declare -f fio_run); $(declare -p URI); DIR=$DIR SECS=$SECS fio_run $s $rw $bs $qd" >"$out/j" 2>"$out/e"; then
                echo "$name $s failed: $(tail -2 "$out/e")" >&2; continue
            fi
            c1=0; [ -n "$pid" ] && c1=$(cpu_ticks "$pid"); t1=$(date +%s.%N)
            scpu=$(awk -v a="$c0" -v b="$c1" -v x="$t0" -v y="$t1" -v h="$CLK_TCK" -v p="$pid" 'BEGIN{ if (p=="") print "-"; else printf "%.0f%%", (b-a)/h/(y-x)*100}')
            python3 - "$out/j" "$load" "$scpu" >>"$out/runs" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]  # the nbd engine prints a line first
d = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
pct = d["clat_ns"].get("percentile", {})
p = lambda k: pct.get(k, 0) / 1000
print(f'{d["iops"]:.0f} {d["bw_bytes"] / 1048576:.1f} {d["lat_ns"]["mean"] / 1000:.1f} {p("50.000000"):.1f} {p("99.000000"):.1f} {p("99.900000"):.1f} {sys.argv[3]} {sys.argv[2]}')
PY
        done
        [ -s "$out/runs" ] || { rows+=("| $name | $s | failed |||||||||"); continue; }
        n=$(wc -l <"$out/runs")
        row=$(sort -g "$out/runs" | sed -n "$(( (n + 1) / 2 ))p")
        lo=$(sort -g "$out/runs" | head -1 | cut -d' ' -f1); hi=$(sort -g "$out/runs" | tail -1 | cut -d' ' -f1)
        MED[$name/$s]=${row%% *}
        rows+=("$name|$s|$lo|$hi|$row")
    done
done <<<"$ALL_JOBS"

# Ratios: each server's median IOPS over its peers' (PEER[server], comma separated).
declare -A PEER=([corral-malloc]=nbdkit-memory [corral-file]=qemu-nbd-file)
[ -n "${PEERS:-}" ] && eval "PEER=($PEERS)"
echo "| job | server | IOPS [range] | MiB/s | mean µs | p50 µs | p99 µs | p99.9 µs | server CPU | ratio | load |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do
    IFS='|' read -r name s lo hi row <<<"$r"
    [ -z "$row" ] && { echo "$r"; continue; }
    set -- $row
    ratio=""
    p=${PEER[$s]:-}
    for peer in ${p//,/ }; do
        [ -n "${MED[$name/$peer]:-}" ] || continue
        ratio+=$(awk -v a="$1" -v b="${MED[$name/$peer]}" -v p="$peer" 'BEGIN{ if (b>0) printf "%.2f× %s ", a/b, p}')
    done
    ratio=${ratio:--}
    echo "| $name | $s | $1 [$lo–$hi] | $2 | $3 | $4 | $5 | $6 | $7 | $ratio | $8 |"
done
