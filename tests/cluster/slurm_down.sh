#!/usr/bin/env bash
# Stop the test cluster started by tests/cluster/slurm_up.sh.
#
#   bash tests/cluster/slurm_down.sh           # stop slurmd and slurmctld (state kept)
#   bash tests/cluster/slurm_down.sh --purge   # ... and delete $LLMTRAIN_SLURM_DIR
#
# Only the daemons whose pid files live in our directory are stopped; munged is left running
# (other software may use it).
set -uo pipefail

SLURM_DIR="${LLMTRAIN_SLURM_DIR:-/tmp/llmtrain-slurm}"
CONF="$SLURM_DIR/etc/slurm.conf"
purge=0
[[ "${1:-}" == "--purge" ]] && purge=1

stop() {  # stop <pidfile> <comm>
    local pid
    [[ -s "$1" ]] || return 0
    pid="$(cat "$1")"
    [[ -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == "$2" ]] || return 0
    echo "slurm_down: stopping $2 (pid $pid)" >&2
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do [[ -d "/proc/$pid" ]] || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

if [[ -f "$CONF" ]]; then
    export SLURM_CONF="$CONF"
    # Cancel our jobs first so their slurmstepd processes end with them.
    if scancel --full --user="$(id -un)" >/dev/null 2>&1; then
        for _ in $(seq 30); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
fi
stop "$SLURM_DIR/run/slurmd.pid" slurmd
stop "$SLURM_DIR/run/slurmctld.pid" slurmctld
if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
fi
if ((purge)); then
    rm -rf "$SLURM_DIR"
    echo "slurm_down: removed $SLURM_DIR" >&2
fi
exit 0
