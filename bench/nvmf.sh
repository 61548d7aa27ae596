#!/usr/bin/env bash
# NVMe/TCP: `corral bench` against `corral target --malloc-mib 1024` over
# loopback, target pinned to CPU 0 and load generator to CPU 1 (taskset), with
# SPDK's figures on this machine class beside each row for orientation.
#
#   bench/nvmf.sh [SECONDS per run, default 5] [REPS, default 3]
#   env: MODES="epoll poll poll+tpoll": the load generator sleeps in epoll, or
#        busy-polls (--poll, as spdk_nvme_perf does); poll+tpoll also gives the
#        target a busy-poll window (--poll-us 50; SPDK's target polls all the time),
#        JOBS="4k-randread-1 ..." (a subset), NO_BUILD=1, LOAD_MAX, LOAD_WAIT
#
# Prints a markdown table: the median run of REPS (by IOPS) and the IOPS range.
# Bounded: about (jobs x modes x REPS x (SECONDS+1+load wait)) seconds.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
SECS=${1:-5}
REPS=${2:-3}
MODES=${MODES:-epoll poll poll+tpoll}
need taskset util-linux; need python3 python3; need cargo; need_done
build_corral

# name pattern size qd  SPDK-orientation(value unit)
ALL_JOBS="4k-randread-1:randread:4k:1:94000:IOPS
4k-randwrite-1:randwrite:4k:1:94000:IOPS
4k-randread-32:randread:4k:32:520000:IOPS
4k-randwrite-32:randwrite:4k:32:415000:IOPS
128k-read-16:read:128k:16:3529:MiB/s
128k-write-16:write:128k:16:3529:MiB/s"
want=${JOBS:-}

out=$(mktemp -d)
trap 'cleanup; rm -rf "$out"' EXIT INT TERM
declare -A PORT TPID
# Two targets, both pinned to CPU 0: without and with a busy-poll window (an
# idle target does not spin: only I/O queues poll).
for t in plain tpoll; do
    extra=""; [ "$t" = tpoll ] && extra="--poll-us 50"
    taskset -c 0 "$CORRAL" target --malloc-mib 1024 --listen 127.0.0.1:0 --print-ready $extra >"$out/$t.out" 2>"$out/$t.err" &
    TPID[$t]=$!; PIDS+=("${TPID[$t]}")
    for _ in $(seq 100); do grep -q '^ready' "$out/$t.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^ready' "$out/$t.out" || { echo "corral target did not start:"; cat "$out/$t.err"; exit 1; }
    PORT[$t]=$(sed -n 's/^ready .*:\([0-9]*\)$/\1/p' "$out/$t.out")
    pin_all "${TPID[$t]}" 0
    # Write the namespace once (the malloc bdev allocates on first write;
    # SPDK's is preallocated), and check that reads return it.
    timeout 120 taskset -c 1 $BENCH --trsvcid "${PORT[$t]}" --prefill --verify -w randread -q 32 -t 1 --core 1 >"$out/prefill" 2>&1 ||
        { echo "prefill failed:"; cat "$out/prefill"; exit 1; }
done

echo "### NVMe/TCP: corral bench -> corral target (malloc 1 GiB), loopback"
echo
machine
echo "- target: \`taskset -c 0 corral target --malloc-mib 1024 [--poll-us 50]\`; load generator: \`taskset -c 1 $BENCH_NAME --core 1 -q QD --io-size SIZE -w PATTERN -t $SECS --warmup 1 [--poll]\`"
echo "- the namespace is written in full first (\`--prefill --verify\`: $(grep -o '[0-9]* blocks matched what this run wrote' "$out/prefill" || echo '?'))"
echo "- $REPS runs of ${SECS}s per row; the median run is shown (IOPS range of all runs in brackets)."
echo "- SPDK column: SPDK's target and spdk_nvme_perf on this machine class (issue 2's orientation figures; SPDK cannot be installed here)."
echo
echo "| job | mode | IOPS [range] | MiB/s | mean µs | p50 µs | p99 µs | p99.9 µs | bench CPU | target CPU | SPDK | corral/SPDK | load |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
while IFS=: read -r name pat size qd spdk unit; do
    if [ -n "$want" ] && [[ " $want " != *" $name "* ]]; then continue; fi
    for mode in $MODES; do
        flag=""; [ "$mode" != epoll ] && flag="--poll"
        t=plain; [ "$mode" = poll+tpoll ] && t=tpoll
        TPID_=${TPID[$t]}
        : >"$out/runs"
        for r in $(seq "$REPS"); do
            load=$(wait_quiet)
            c0=$(cpu_ticks "$TPID_"); t0=$(date +%s.%N)
            if ! timeout $((SECS + 30)) taskset -c 1 $BENCH --trsvcid "${PORT[$t]}" -q "$qd" --io-size "$size" -w "$pat" \
                    -t "$SECS" --warmup 1 --core 1 $flag --json >"$out/j" 2>"$out/e"; then
                echo "| $name | $mode | failed: $(tail -1 "$out/e") |||||||||||"; continue
            fi
            c1=$(cpu_ticks "$TPID_"); t1=$(date +%s.%N)
            tcpu=$(awk -v a="$c0" -v b="$c1" -v x="$t0" -v y="$t1" -v h="$CLK_TCK" 'BEGIN{printf "%.0f", (b-a)/h/(y-x)*100}')
            python3 - "$out/j" "$load" "$tcpu" >>"$out/runs" <<'PY'
import json, sys
j = json.load(open(sys.argv[1])); t = j["total"]; l = t["latency_us"]
print(f'{t["iops"]:.0f} {t["mib_per_sec"]:.1f} {l["mean"]:.1f} {l["p50"]:.1f} {l["p99"]:.1f} {l["p99.9"]:.1f} {j["cpu_percent"]:.0f} {sys.argv[3]} {sys.argv[2]}')
PY
        done
        [ -s "$out/runs" ] || continue
        n=$(wc -l <"$out/runs")
        row=$(sort -g "$out/runs" | sed -n "$(( (n + 1) / 2 ))p")
        lo=$(sort -g "$out/runs" | head -1 | cut -d' ' -f1); hi=$(sort -g "$out/runs" | tail -1 | cut -d' ' -f1)
        set -- $row
        if [ "$unit" = IOPS ]; then ratio=$(awk -v a="$1" -v b="$spdk" 'BEGIN{printf "%.2f", a/b}'); sp="$((spdk / 1000))k IOPS"
        else ratio=$(awk -v a="$2" -v b="$spdk" 'BEGIN{printf "%.2f", a/b}'); sp="3.7 GB/s"; fi
        echo "| $name | $mode | $1 [$lo–$hi] | $2 | $3 | $4 | $5 | $6 | $7% | $8% | $sp | $ratio | $9 |"
    done
done <<<"$ALL_JOBS"
