#!/usr/bin/env bash
# Replica rebuild: how long corral's rebuild of a lost replica takes and what it
# costs the volume's I/O meanwhile, against a whole-device raid rebuild of the
# same volume in the same run (the naive way: every block copied, no snapshots).
#
#   bench/rebuild.sh [SIZE_MIB, default 2048] [SECONDS of the idle baseline, default 5]
#   env: NO_BUILD=1, DIR (default /work/bench-rebuild, removed afterwards)
# Bounded: fills the volume once, one rebuild, one whole-device rebuild (each
# waited for at most 600 s), fio on CPU 1, every corral process on CPU 0.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
SIZE=${1:-2048}
SECS=${2:-5}
DIR=${DIR:-/work/bench-rebuild}
need taskset util-linux; need python3 python3; need fio fio; need cargo
need_done
build_corral
up3 127.0.10
rpc() { "$CORRAL" rpc -s "$DIR/$1/rpc.sock" "$2" "$3"; }
q volume create rb --size "${SIZE}MiB" --replicas 3
q volume attach rb --node node1
URI=$("$CORRAL" volume show rb -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["volume"]["endpoint"])')
f() { taskset -c 1 fio --ioengine=nbd --uri="$URI" "$@" >/dev/null; }
# s1: the whole volume; s2: a quarter rewritten; head: a tenth.
f --name=fill --rw=write --bs=1m --iodepth=4 --size="${SIZE}M"
q snapshot create rb s1
f --name=s2 --rw=randwrite --bs=64k --iodepth=8 --io_size=$((SIZE / 4))M --size="${SIZE}M" --randrepeat=0
q snapshot create rb s2
f --name=head --rw=randwrite --bs=64k --iodepth=8 --io_size=$((SIZE / 10))M --size="${SIZE}M" --randrepeat=0

# The load: 4 KiB random writes, QD8, on CPU 1. JOB [runtime] -> IOPS on stdout.
JOB=(--name=load --rw=randwrite --bs=4k --iodepth=8 --size="${SIZE}M" --time_based --output-format=json)
iops() { python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["write"]["iops"]))' "$1"; }
taskset -c 1 fio --ioengine=nbd --uri="$URI" "${JOB[@]}" --runtime="$SECS" >"$DIR/idle.json"
IDLE=$(iops "$DIR/idle.json")

# Runs fio until `cond` holds (bounded); prints "seconds iops".
during() { # during CONDITION_FN
    taskset -c 1 fio --ioengine=nbd --uri="$URI" "${JOB[@]}" --runtime=900 >"$DIR/during.json" 2>/dev/null &
    local fio=$! t0 t1
    sleep 0.5
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    kill -INT "$fio"; wait "$fio" || true
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') $(iops "$DIR/during.json")"
}
replicas() { "$CORRAL" replica ls --volume rb -o json; }
VICTIM=$(replicas | python3 -c 'import json,sys; print([r["name"] for r in json.load(sys.stdin) if r["node"]=="node3"][0])')
SOURCE=$(replicas | python3 -c 'import json,sys; print([r["name"] for r in json.load(sys.stdin) if r["node"]=="node1"][0])')
allocated() { # allocated LVOL -> bytes its own layer holds on node1
    rpc node1 corral_lvol_get_fragmap "{\"name\":\"disk0/$1\",\"scope\":\"layer\"}" |
        python3 -c 'import json,sys; f=json.load(sys.stdin); print(f["num_allocated_blocks"]*f["block_size"])'
}
CHAIN=$(( $(allocated "$SOURCE.snap.s1") + $(allocated "$SOURCE.snap.s2") + $(allocated "$SOURCE") ))
corral_rebuild() {
    rpc node1 bdev_raid_remove_base_bdev "{\"name\":\"${VICTIM}n1\"}" >/dev/null
    for _ in $(seq 3000); do
        replicas | python3 -c 'import json,sys,os; r=json.load(sys.stdin); sys.exit(0 if len(r)==3 and all(x["state"]=="healthy" for x in r) and not any(x["name"]==os.environ["V"] for x in r) else 1)' && return 0
        sleep 0.2
    done
    echo "rebuild did not finish in 600 s" >&2; return 1
}
read -r T1 IOPS1 < <(V=$VICTIM during corral_rebuild)
"$CORRAL" events | grep -E "Rebuil|Replaced" >"$DIR/rebuild.events" || true

# The peer: a fresh lvol on node3 joins the same raid with a whole-device rebuild.
SUB=nqn.2025-01.io.bench:full
full_rebuild() {
    rpc node3 bdev_lvol_create "{\"lvol_name\":\"full\",\"size_in_mib\":$SIZE,\"thin_provision\":true,\"lvs_name\":\"disk0\"}" >/dev/null
    rpc node3 nvmf_create_subsystem "{\"nqn\":\"$SUB\",\"allow_any_host\":true}" >/dev/null
    rpc node3 nvmf_subsystem_add_ns "{\"nqn\":\"$SUB\",\"namespace\":{\"bdev_name\":\"disk0/full\"}}" >/dev/null
    rpc node3 nvmf_subsystem_add_listener "{\"nqn\":\"$SUB\",\"listen_address\":{\"trtype\":\"TCP\",\"adrfam\":\"IPv4\",\"traddr\":\"127.0.10.3\",\"trsvcid\":\"$(nvmf_port)\"}}" >/dev/null 2>&1 || true
    rpc node1 bdev_nvme_attach_controller "{\"name\":\"full\",\"trtype\":\"tcp\",\"adrfam\":\"ipv4\",\"traddr\":\"127.0.10.3\",\"trsvcid\":\"$(nvmf_port)\",\"subnqn\":\"$SUB\"}" >/dev/null
    rpc node1 bdev_raid_add_base_bdev '{"raid_bdev":"rb","base_bdev":"fulln1"}' >/dev/null
    for _ in $(seq 3000); do
        rpc node1 bdev_raid_get_bdevs '{"name":"rb"}' | python3 -c 'import json,sys; r=json.load(sys.stdin)[0]; sys.exit(0 if any(b.get("member")=="fulln1" and b["state"]=="online" for b in r["base_bdevs_list"]) else 1)' && return 0
        sleep 0.2
    done
    echo "whole-device rebuild did not finish in 600 s" >&2; return 1
}
# The port node3's replica subsystems listen on (corral up gives each node its own).
nvmf_port() { rpc node3 nvmf_get_subsystems '{}' | python3 -c 'import json,sys; print([l["trsvcid"] for s in json.load(sys.stdin) if ":replica:" in s["nqn"] for l in s.get("listen_addresses",[])][0])'; }
read -r T2 IOPS2 < <(during full_rebuild)

echo "## Replica rebuild (bench/rebuild.sh)"
echo
machine
echo "- 3 nodes of \`corral up\` on 127.0.10.1-3 (every corral process on CPU 0); a ${SIZE} MiB volume, 3 replicas, attached on node1 over NBD: s1 = the whole volume written, s2 = a quarter rewritten (64 KiB random), head = a tenth rewritten."
echo "- load during each rebuild: \`fio --rw=randwrite --bs=4k --iodepth=8\` on CPU 1 through NBD; idle: the same for ${SECS} s with no rebuild: $IDLE IOPS."
echo "- corral: node3's replica leaves the mirror (\`bdev_raid_remove_base_bdev\`); timed until a new replica is healthy and the old one removed. It copies what the source's layers hold: $((CHAIN >> 20)) MiB."
echo "- whole-device: a fresh lvol on node3 joins the same raid with \`bdev_raid_add_base_bdev\` (no ranges): every block of the volume is copied, ${SIZE} MiB, and no snapshot."
echo
echo "| rebuild | data copied MiB | seconds | MiB/s | load IOPS during | vs idle |"
echo "|---|---|---|---|---|---|"
row() { awk -v n="$1" -v mib="$2" -v t="$3" -v i="$4" -v idle="$IDLE" 'BEGIN{printf "| %s | %d | %.1f | %.0f | %d | %.2f× |\n", n, mib, t, (t>0?mib/t:0), i, (idle>0?i/idle:0)}'; }
row "corral (snapshots + head delta)" $((CHAIN >> 20)) "$T1" "$IOPS1"
row "whole device (raid only)" "$SIZE" "$T2" "$IOPS2"
echo
echo "Phases of corral's rebuild (events, 1 s resolution):"
echo
echo '```'
sed 's/^ *[0-9]* *//' "$DIR/rebuild.events"
echo '```'
