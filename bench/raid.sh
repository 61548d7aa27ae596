#!/usr/bin/env bash
# raid1 through NBD: a raid1 of 3 members against 1 member and against the
# bare member, over malloc bdevs and over NVMe bdevs attached from `corral target`s.
#   bench/raid.sh [SECONDS per run, default 5] [REPS, default 3]   (env as bench/nbd.sh)
export SERVERS=${SERVERS:-corral-malloc corral-raid1x1 corral-raid1x3 corral-nvme corral-raid1x3-nvme}
export PEERS=${PEERS:-[corral-raid1x1]=corral-malloc [corral-raid1x3]=corral-raid1x1,corral-malloc [corral-raid1x3-nvme]=corral-nvme}
export TITLE=${TITLE:-raid1 of 3 members vs 1 member, through NBD (fio --ioengine=nbd)}
exec "$(dirname "$0")/nbd.sh" "$@"
