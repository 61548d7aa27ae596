#!/usr/bin/env bash
# lvol: an lvol head with 0, 10 and 100 snapshots under it, exported over NBD,
# against qemu-nbd on a file of the same filesystem and direct fio io_uring on a
# file (the ceiling). Read cost must not grow with the chain.
#   bench/lvol.sh [SECONDS per run, default 5] [REPS, default 3]   (env as bench/nbd.sh; DIR picks the filesystem)
export SERVERS=${SERVERS:-fio-direct qemu-nbd-lvfile corral-lvol0 corral-lvol10 corral-lvol100}
export PEERS=${PEERS:-[corral-lvol0]=qemu-nbd-lvfile,fio-direct [corral-lvol10]=corral-lvol0,qemu-nbd-lvfile [corral-lvol100]=corral-lvol0,qemu-nbd-lvfile [qemu-nbd-lvfile]=fio-direct}
export TITLE=${TITLE:-lvol head over NBD vs qemu-nbd on a file vs direct fio io_uring, 0/10/100 snapshots}
exec "$(dirname "$0")/nbd.sh" "$@"
