# Shared helpers of the bench/ scripts (sourced, not run).
# Nothing here installs anything: `need` says what is missing and the caller exits.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CORRAL=${CORRAL:-$TARGET_DIR/release/corral}
# Wait at most this long (s) for the 1-minute load average to fall below LOAD_MAX.
LOAD_WAIT=${LOAD_WAIT:-60}
LOAD_MAX=${LOAD_MAX:-1.0}
PIDS=()

missing=()
need() { # need CMD [package]
    command -v "$1" >/dev/null 2>&1 || missing+=("$1${2:+ (Debian package $2)}")
}
need_done() {
    if [ ${#missing[@]} -gt 0 ]; then
        echo "missing: ${missing[*]}" >&2
        echo "install them (e.g. apt-get install ...) and run again; nothing was run." >&2
        exit 2
    fi
}

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
trap cleanup EXIT INT TERM

# Builds corral (release) unless NO_BUILD=1; sets BENCH to the load generator.
build_corral() {
    if [ "${NO_BUILD:-0}" != 1 ]; then
        (cd "$ROOT" && cargo build --release -q -p corral --bin corral --example bench) >&2 || exit 1
    fi
    [ -x "$CORRAL" ] || { echo "no corral binary at $CORRAL" >&2; exit 2; }
    if "$CORRAL" bench --help >/dev/null 2>&1; then
        BENCH="$CORRAL bench"; BENCH_NAME="corral bench"
    else
        # `corral bench` not wired into main.rs yet: the same code as an example.
        BENCH=$TARGET_DIR/release/examples/bench; BENCH_NAME="corral bench (examples/bench)"
    fi
}

load1() { cut -d' ' -f1 /proc/loadavg; }

# Waits (bounded) for a quiet machine; prints the load it settled on.
wait_quiet() {
    local t=0
    while [ "$t" -lt "$LOAD_WAIT" ] && awk -v l="$(load1)" -v m="$LOAD_MAX" 'BEGIN{exit !(l>m)}'; do
        sleep 5; t=$((t + 5))
    done
    load1
}

machine() {
    echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(cd "$ROOT" && git rev-parse --short HEAD)"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# CPU ticks (user+system) used so far by process $1, all threads.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
CLK_TCK=$(getconf CLK_TCK)

# Pins every thread of process $1 to CPU $2.
pin_all() {
    local t
    for t in /proc/"$1"/task/*; do taskset -pc "$2" "${t##*/}" >/dev/null 2>&1 || true; done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() { # wait_port PORT [seconds]
    local i=0
    while ! (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; do
        i=$((i + 1)); [ "$i" -gt $((${2:-10} * 10)) ] && return 1; sleep 0.1
    done
}

# Median of the numbers on stdin.
median() { sort -g | awk '{a[NR]=$1} END{ if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

# Starts `corral up --nodes 3 --no-volume` in $DIR on addresses PREFIX.1-3
# (removing $DIR at exit), waits for the nodes, pins every corral process to
# CPU 0, and exports CORRAL_MANAGER. `q` runs a quiet CLI command.
up3() { # up3 ADDRESS_PREFIX
    rm -rf "$DIR"; mkdir -p "$DIR"
    local port i p
    port=$(free_port)
    export CORRAL_MANAGER=http://127.0.0.1:$port
    trap 'cleanup; rm -rf "$DIR"' EXIT INT TERM
    "$CORRAL" up --data-dir "$DIR" --nodes 3 --no-volume --manager-listen "127.0.0.1:$port" \
        --address-prefix "$1" >"$DIR/up.out" 2>&1 &
    PIDS+=($!)
    for i in $(seq 100); do "$CORRAL" node ls -o json 2>/dev/null | python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if len(n)==3 and all(x["ready"] for x in n) else 1)' 2>/dev/null && break; sleep 0.3; done
    for p in $(pgrep -f "corral (dataplane|agent|manager).*$DIR"); do pin_all "$p" 0; done
}
q() { "$CORRAL" "$@" >/dev/null; }
