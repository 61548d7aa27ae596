#!/bin/sh
# Benchmarks of an lvol head (io_uring data path) against direct fio io_uring on
# a file of the same filesystem, and bdev::file over the same reactor and
# harness. Usage: crates/lvol/bench.sh [DIR] [SECONDS]   (DIR default /work/bench-lvol)
set -e
DIR=${1:-/work/bench-lvol}
T=${2:-5}
mkdir -p "$DIR"
cd "$(dirname "$0")/../.."
cargo build --release -p lvol --example lvol_bench
BIN=${CARGO_TARGET_DIR:-target}/release/examples/lvol_bench
F=$DIR/fio.file
run() { fio --name="$1" --filename=$F --size=2G --ioengine=io_uring --direct=1 --rw=$2 --bs=$3 --iodepth=$4 \
          --runtime=$T --time_based --output-format=terse --terse-version=3 2>/dev/null |
        awk -F';' -v n="$1" '{ if ($7>0) printf "fio           %-32s %9d IOPS %8.1f MB/s\n", n, $8, $7/1024;
                               if ($48>0) printf "fio           %-32s %9d IOPS %8.1f MB/s\n", n, $49, $48/1024 }'; }
for rep in $(seq ${REPS:-1}); do
run "randwrite 4k qd32" randwrite 4k 32
run "randwrite 4k qd1" randwrite 4k 1
run "randread 4k qd32" randread 4k 32
run "randread 4k qd1" randread 4k 1
run "seqwrite 128k qd8" write 128k 8
run "seqread 128k qd8" read 128k 8
done
"$BIN" "$F" 2048 file "$T"
for n in 0 10 100; do "$BIN" "$DIR/lvs$n" 2048 $n "$T"; done
rm -rf "$DIR"
