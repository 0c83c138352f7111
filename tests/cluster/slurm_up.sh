#!/usr/bin/env bash
# Start a real single-node Slurm cluster (slurmctld + slurmd on this host) for the test-suite.
#
#   bash tests/cluster/slurm_up.sh        # idempotent: a running cluster is left as it is
#   . /tmp/llmtrain-slurm/env.sh          # then sinfo / sbatch / srun talk to it
#   bash tests/cluster/slurm_down.sh      # stop it (add --purge to delete its state too)
#
# Everything lives under $LLMTRAIN_SLURM_DIR (default /tmp/llmtrain-slurm): config, state,
# spool, pid and log files. Clients find the config through SLURM_CONF (written to env.sh);
# when /etc/slurm/slurm.conf does not exist, a symlink to ours is placed there as well so a
# bare `sinfo` works too (slurm_down.sh removes it again, only if it is still our symlink).
#
# Set LLMTRAIN_SLURM_NO_INSTALL=1 to never run apt-get (exit 3 instead when Slurm is missing).
# Needs root (it installs Debian packages and runs the daemons as SlurmUser=root).
# Exit codes: 0 cluster up and the node idle, 3 cannot run here (not root / no apt),
# 1 anything else (the message names the log to read).
set -euo pipefail

SLURM_DIR="${LLMTRAIN_SLURM_DIR:-/tmp/llmtrain-slurm}"
CONF="$SLURM_DIR/etc/slurm.conf"
UP_TIMEOUT_S="${LLMTRAIN_SLURM_UP_TIMEOUT:-60}"   # seconds to wait for the node to become idle
NODE="$(hostname -s)"

log() { echo "slurm_up: $*" >&2; }
die() { local code="$1"; shift; log "ERROR: $*"; exit "$code"; }

# --- packages -------------------------------------------------------------------------------
need_pkgs=()
command -v slurmctld >/dev/null 2>&1 || need_pkgs+=(slurm-wlm)
command -v munged    >/dev/null 2>&1 || need_pkgs+=(munge)
if ((${#need_pkgs[@]})); then
    [[ "${LLMTRAIN_SLURM_NO_INSTALL:-0}" == 1 ]] && die 3 "Slurm is not installed (${need_pkgs[*]} missing) and LLMTRAIN_SLURM_NO_INSTALL=1 forbids installing it"
    [[ $(id -u) -eq 0 ]] || die 3 "Slurm is not installed (${need_pkgs[*]} missing) and installing it needs root; run as root or install slurm-wlm and munge yourself"
    command -v apt-get >/dev/null 2>&1 || die 3 "no apt-get here: install slurm-wlm and munge (Debian/Ubuntu package names) yourself"
    log "installing ${need_pkgs[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${need_pkgs[@]}" >"/tmp/llmtrain-slurm-apt.log" 2>&1; then
        apt-get update >>"/tmp/llmtrain-slurm-apt.log" 2>&1 || true
        apt-get install -y --no-install-recommends "${need_pkgs[@]}" >>"/tmp/llmtrain-slurm-apt.log" 2>&1 \
            || die 3 "apt-get install ${need_pkgs[*]} failed; see /tmp/llmtrain-slurm-apt.log"
    fi
fi
alive() {  # alive <pidfile> <comm>: the pid in the file runs a process of that name
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(cat "$1")"
    [[ -n "$pid" && -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == "$2" ]]
}
wait_idle() {  # wait until the node is usable (resuming it if it is down); exit with a verdict
    local start_t=$1 state="" reason
    while ((SECONDS - start_t < UP_TIMEOUT_S)); do
        state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)"
        case "$state" in
            idle|mixed|allocated|completing) break ;;
            down*|drain*|fail*)
                # e.g. left DOWN in saved state by an earlier slurmd that was killed
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    case "$state" in
        idle|mixed|allocated|completing)
            log "cluster up: node $NODE $state after $((SECONDS - start_t)) s; SLURM_CONF=$CONF (. $SLURM_DIR/env.sh)"
            exit 0 ;;
        *)
            reason="$(sinfo -h -n "$NODE" -o '%E' 2>/dev/null || true)"
            die 1 "node $NODE not idle after ${UP_TIMEOUT_S} s (state '${state:-no answer}', reason '${reason}'); see $SLURM_DIR/log/slurmctld.log and slurmd.log" ;;
    esac
}

# Daemons run as SlurmUser=root and munged's key is root/munge-owned: starting them needs root.
# A cluster that root already started is usable by anyone.
if [[ $(id -u) -ne 0 ]]; then
    if alive "$SLURM_DIR/run/slurmctld.pid" slurmctld && alive "$SLURM_DIR/run/slurmd.pid" slurmd; then
        export SLURM_CONF="$CONF"
        wait_idle "$SECONDS"
    fi
    die 3 "starting slurmctld/slurmd with SlurmUser=root needs root (uid $(id -u)); run 'sudo bash $0' once"
fi

# --- munge ----------------------------------------------------------------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    log "starting munged"
    # A stale socket/pid from a killed munged makes it refuse to start; --force takes them over.
    runuser -u munge -- /usr/sbin/munged --force \
        || die 1 "munged failed to start; see /var/log/munge/munged.log"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die 1 "munged started but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
fi

# --- config ---------------------------------------------------------------------------------
mkdir -p "$SLURM_DIR"/{etc,state,spool,run,log}
# nproc honours OMP_NUM_THREADS (tests/conftest.py sets it to 1): ask without it.
cpus="${LLMTRAIN_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
# RealMemory a little below MemTotal: a node reporting less than configured gets drained.
mem_mb="$(free -m | awk '/^Mem:/{print int($2 * 0.95)}')"
ctld_port="${LLMTRAIN_SLURM_CTLD_PORT:-6817}"
slurmd_port="${LLMTRAIN_SLURM_SLURMD_PORT:-6818}"
new_conf="$(cat <<EOF
# Written by tests/cluster/slurm_up.sh: a single-node test cluster. Rewritten whenever the daemons are started.
ClusterName=llmtrain
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
# No cgroups: plain /proc process tracking, no task binding (containers often lack cgroup v2 delegation).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MailProg=/bin/true
MpiDefault=none
# A node that went DOWN (e.g. slurmd restarted) comes back by itself once it registers.
ReturnToService=2
JobRequeue=1
# A requeued job may start again only after the step credential lifetime (cred_expire, default 120 s):
# 10 s here so that requeue tests do not idle for two minutes (launching a step takes well under 10 s).
AuthInfo=cred_expire=10
# Scheduling passes every second (defaults: main loop 60 s, backfill 30 s), so a job whose begin
# time passed (a requeued one) starts at once instead of at the next pass.
SchedulerParameters=sched_interval=1,bf_interval=1
# Lets LLMTRAIN_SLURM_CPUS declare more CPUs than the host has without the node being drained.
SlurmdParameters=config_overrides
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/run/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Short timeouts: tests cancel jobs and want them gone quickly.
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)"
# --- already running? -----------------------------------------------------------------------
# Then keep it (running jobs survive); a changed config is written and reread with `scontrol reconfigure`.
if alive "$SLURM_DIR/run/slurmctld.pid" slurmctld && alive "$SLURM_DIR/run/slurmd.pid" slurmd; then
    export SLURM_CONF="$CONF"
    if [[ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ]]; then
        log "config changed: rewriting $CONF and running scontrol reconfigure"
        printf '%s\n' "$new_conf" >"$CONF"
        scontrol reconfigure >/dev/null 2>&1 || log "scontrol reconfigure failed; run slurm_down.sh and slurm_up.sh to restart"
    fi
    wait_idle "$SECONDS"
fi
printf '%s\n' "$new_conf" >"$CONF"
# slurmd reads cgroup.conf beside slurm.conf even with no cgroup plugin configured.
[[ -s "$SLURM_DIR/etc/cgroup.conf" ]] || echo "CgroupAutomount=no  # unused: no cgroup plugins (see slurm.conf)" >"$SLURM_DIR/etc/cgroup.conf"
printf 'export SLURM_CONF=%q\n' "$CONF" >"$SLURM_DIR/env.sh"
export SLURM_CONF="$CONF"
if [[ ! -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -s "$CONF" /etc/slurm/slurm.conf
fi

# --- daemons --------------------------------------------------------------------------------
start_t=$SECONDS
if alive "$SLURM_DIR/run/slurmctld.pid" slurmctld; then
    scontrol reconfigure >/dev/null 2>&1 || true   # only slurmd was down: slurmctld rereads the new config
else
    log "starting slurmctld (log: $SLURM_DIR/log/slurmctld.log)"
    /usr/sbin/slurmctld -f "$CONF" || die 1 "slurmctld failed to start; see $SLURM_DIR/log/slurmctld.log"
fi
if ! alive "$SLURM_DIR/run/slurmd.pid" slurmd; then
    log "starting slurmd (log: $SLURM_DIR/log/slurmd.log)"
    /usr/sbin/slurmd -f "$CONF" -N "$NODE" || die 1 "slurmd failed to start; see $SLURM_DIR/log/slurmd.log"
fi

# --- wait for the node ----------------------------------------------------------------------
wait_idle "$start_t"
