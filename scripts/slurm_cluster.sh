#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests and CI: scripts/slurm_cluster.sh start|stop|status
#
# start: installs Debian's slurm-wlm and munge if missing, writes /etc/slurm/slurm.conf for this
#        machine (refusing to overwrite a configuration it did not write), starts munged, slurmctld
#        and slurmd, and waits until sinfo shows the node idle. Idempotent.
# stop:  stops the three daemons (by their pid files) and leaves the configuration in place.
# status: scontrol ping, sinfo and squeue; exit 1 if slurmctld does not answer.
#
# Needs root. No cgroups (VMs and containers often lack them): processes are tracked through
# /proc (proctrack/linuxproc), tasks are not bound (task/none), and there is no accounting.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by ctxpar scripts/slurm_cluster.sh"
STATE=/var/spool/ctxpar-slurm
RUN=/run/ctxpar-slurm
LOGS="$STATE/log"
PARTITION=debug
WAIT_S=${SLURM_CLUSTER_WAIT_S:-60}

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing and installing them needs root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's configuration"
    fi
    mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
    # slurmd -C describes this machine's hardware exactly (CPUs, sockets, cores, RealMemory), and
    # slurmd refuses to register a node whose configuration promises more than it finds.
    local node host
    node=$(slurmd -C | head -n 1)
    host=$(hostname -s)
    cat >"$CONF" <<EOF
$MARK
ClusterName=ctxpar
# The daemons talk over loopback: no dependence on this host's name resolving.
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down (a daemon restart) comes back by itself.
ReturnToService=2
# Time between SIGTERM and SIGKILL when a job ends or is requeued: long enough to exit cleanly.
KillWait=30
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n </dev/null >/dev/null 2>&1; then
        return  # a munged already answers
    fi
    [ -f /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$RUN/munged.ours"  # stop ends munged only if this script started it
    munge -n </dev/null | unmunge >/dev/null || die "munged started but does not answer"
}

start_daemons() {
    running "$RUN/slurmctld.pid" || slurmctld || die "slurmctld failed to start: $(tail -n 5 "$LOGS/slurmctld.log" 2>/dev/null)"
    running "$RUN/slurmd.pid" || slurmd || die "slurmd failed to start: $(tail -n 5 "$LOGS/slurmd.log" 2>/dev/null)"
}

wait_idle() {
    local node state
    node=$(hostname -s)
    for _ in $(seq "$WAIT_S"); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
        case "$state" in
            idle|mixed|allocated) return ;;
            # slurmd registered while slurmctld still thought the node down (a previous run).
            down*|drain*) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node $node is not idle after ${WAIT_S}s (sinfo says '${state:-nothing}'); logs: $LOGS"
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$RUN/slurmd.pid" "$RUN/slurmctld.pid"; do
        if running "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            # Wait, so that a start right after a stop does not find the ports still bound.
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
    done
    if [ -f "$RUN/munged.ours" ] && running /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)"
    fi
    rm -f "$RUN/munged.ours"
}

case "${1:-}" in
    start)
        install_packages
        write_config
        start_munge
        start_daemons
        wait_idle
        sinfo
        ;;
    stop)
        stop_daemons
        ;;
    status)
        # scontrol ping answers at once when slurmctld is down; sinfo retries for ~10 s.
        scontrol ping && sinfo && squeue
        ;;
    *)
        die "usage: $0 start|stop|status"
        ;;
esac
