#!/usr/bin/env python3
"""corral's NBD server against nbdkit (memory) and qemu-nbd (file), side by side,
with fio's nbd engine. Each server is pinned to one CPU and fio to another.

    cargo build --release -p nbd --example nbd-serve
    python3 crates/nbd/bench/nbd_bench.py [--runtime 10] [--server-cpu 0] [--fio-cpu 1]
        [--reps 3] [--dir DIR] [--only corral-malloc,nbdkit-memory,corral-file,qemu-nbd-file]

Prints one table row per (server, job): IOPS, bandwidth, mean and p99 latency,
and the server's CPU time per I/O (user + system, all threads), the figure
least disturbed by other load on the machine.
Needs fio, nbdkit, qemu-utils, util-linux (taskset).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SERVE = os.path.join(ROOT, "target", "release", "examples", "nbd-serve")
SIZE_MIB = 1024

JOBS = [
    # name, rw, bs, iodepth
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("128k read QD16", "read", "128k", 16),
    ("128k write QD16", "write", "128k", 16),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, limit=20):
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def fio(uri, rw, bs, qd, runtime, cpu, size="1G", time_based=True):
    cmd = [
        "taskset", "-c", str(cpu), "fio", "--name=j", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={size}",
        "--output-format=json", "--randrepeat=0", "--norandommap",
    ]
    if time_based:
        cmd += ["--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120,
                         env=dict(os.environ, FIO_DISABLE_SHM="1"), cwd="/tmp")
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr}")
    text = out.stdout[out.stdout.index("{"):]
    j = json.loads(text)["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    clat = side["clat_ns"]
    p99 = clat.get("percentile", {}).get("99.000000", 0)
    return side["iops"], side["bw"] / 1024.0, clat["mean"] / 1000.0, p99 / 1000.0


def cpu_seconds(pid):
    """User + system CPU time of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def start(kind, port, path, cpu):
    pin = ["taskset", "-c", str(cpu)]
    if kind == "corral-malloc":
        cmd = pin + [SERVE, "--listen", f"127.0.0.1:{port}", "--name", "b",
                     "--malloc-mib", str(SIZE_MIB), "--threads", "1"]
    elif kind == "corral-file":
        cmd = pin + [SERVE, "--listen", f"127.0.0.1:{port}", "--name", "b",
                     "--file", path, "--threads", "1"]
    elif kind == "nbdkit-memory":
        cmd = pin + ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1",
                     "memory", f"size={SIZE_MIB}M"]
    elif kind == "qemu-nbd-file":
        cmd = pin + ["qemu-nbd", "--cache=none", "--aio=io_uring", "-f", "raw",
                     "-x", "b", "-p", str(port), "-b", "127.0.0.1", "-t", path]
    else:
        raise ValueError(kind)
    env = dict(os.environ, RUST_LOG="warn")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_port(port, p)
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--fio-cpu", type=int, default=1)
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "nbd-bench"))
    ap.add_argument("--only", default="corral-malloc,nbdkit-memory,corral-file,qemu-nbd-file")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    path = os.path.join(a.dir, "disk.img")
    kinds = a.only.split(",")
    if any(k.endswith("file") for k in kinds):
        # A fully written file, so that reads hit real blocks.
        subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M",
                        f"count={SIZE_MIB}", "status=none", "conv=fsync"], check=True)
    # Servers alternate within each repetition, so that load that comes and
    # goes on a shared machine hits them alike; medians are reported.
    results = {}
    for rep in range(a.reps):
        for kind in kinds:
            port = free_port()
            p = start(kind, port, path, a.server_cpu)
            uri = f"nbd://127.0.0.1:{port}/b"
            try:
                # Fill the device, so that reads return written data everywhere.
                fio(uri, "write", "1M", 8, a.runtime, a.fio_cpu, time_based=False)
                for name, rw, bs, qd in JOBS:
                    c0, t0 = cpu_seconds(p.pid), time.time()
                    iops, mib, lat, p99 = fio(uri, rw, bs, qd, a.runtime, a.fio_cpu)
                    c1, t1 = cpu_seconds(p.pid), time.time()
                    # Server CPU per I/O, over the whole fio run (ramp included).
                    cpu_us = (c1 - c0) * 1e6 / max(iops * (t1 - t0), 1)
                    results.setdefault((kind, name), []).append((iops, mib, lat, p99, cpu_us))
                    print(f"rep {rep} {kind:15} {name:18} {iops:10.0f} IOPS {mib:9.1f} MiB/s "
                          f"lat {lat:8.1f} us  p99 {p99:8.1f} us  cpu {cpu_us:6.1f} us/IO",
                          flush=True)
            finally:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print()
    print(f"Medians of {a.reps} runs of {a.runtime} s; server on CPU {a.server_cpu}, fio on CPU {a.fio_cpu}.")
    print()
    print("| server | job | IOPS | MiB/s | mean lat (µs) | p99 lat (µs) | server CPU (µs/IO) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind in kinds:
        for name, _, _, _ in JOBS:
            runs = results[(kind, name)]
            med = [sorted(r[i] for r in runs)[len(runs) // 2] for i in range(5)]
            iops, mib, lat, p99, cpu_us = med
            print(f"| {kind} | {name} | {iops:.0f} | {mib:.1f} | {lat:.1f} | {p99:.1f} | {cpu_us:.1f} |")

if __name__ == "__main__":
    sys.exit(main())
