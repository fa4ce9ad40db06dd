#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests and for trying the templates.
#
#   sudo bash slurm/local_cluster.sh start    # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd n1 + n2
#   sudo bash slurm/local_cluster.sh status   # daemons and `sinfo`
#   sudo bash slurm/local_cluster.sh stop     # stop the daemons this script started
#
# Both nodes (n1, n2) are slurmd daemons on this host, started with `-N <name>`, each on its own port,
# with NodeAddr=127.0.0.1 and their names added to /etc/hosts, so a 2-node job really runs two
# srun tasks and a rendezvous across "nodes". `start` is idempotent: it installs, writes config and
# starts daemons only where something is missing, and it restarts the daemons when slurm.conf changed.
# It is for a test machine only: it runs SLURM as root and takes over /etc/slurm/slurm.conf.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODES=(n1 n2)
PORTS=(17001 17002)
PARTITION=debug
CTLD_PID=/run/slurmctld.pid
MUNGE_PID=/run/munge/munged.pid
WAIT_S=${LOCAL_CLUSTER_WAIT_S:-60}

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# pid from a pid file, printed only if that process is alive
live_pid() {
    local f=$1 pid
    [[ -r $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

need_root() {
    [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts system daemons): sudo bash $0 $1"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No service starts from the package scripts: this script starts the daemons itself.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    [[ $created_policy == 1 ]] && rm -f "$policy"
    command -v slurmctld >/dev/null || die "slurm-wlm installed but slurmctld is not on PATH"
}

setup_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        head -c 1024 /dev/urandom >/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if ! live_pid "$MUNGE_PID" >/dev/null; then
        log "starting munged"
        # --force: the log directory ownership warning is harmless on a test machine
        runuser -u munge -- munged --force --pid-file="$MUNGE_PID"
    fi
}

setup_hosts() {
    local n
    for n in "${NODES[@]}"; do
        # names must resolve, because `scontrol show hostnames` output is used as the rendezvous address
        grep -Eq "^127\.0\.0\.1[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >>/etc/hosts
    done
}

write_conf() {
    local host cpus i tmp
    host=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it honours OMP_NUM_THREADS
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by slurm/local_cluster.sh: two slurmd daemons (n1, n2) on this one host.
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Both nodes claim the same cores of this host.
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldPort=6817
JobRequeue=1
# Keep finished jobs visible to scontrol show job for 10 minutes (there is no accounting).
MinJobAge=600
KillWait=30
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[$i]} CPUs=$cpus RealMemory=4000 State=UNKNOWN" >>"$tmp"
    done
    local IFS=,
    echo "PartitionName=$PARTITION Nodes=${NODES[*]} Default=YES MaxTime=INFINITE State=UP" >>"$tmp"
    unset IFS
    mkdir -p "$CONF_DIR"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1 # unchanged
    fi
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    return 0
}

start_daemons() {
    local n
    install -d /var/spool/slurmctld /var/log/slurm
    for n in "${NODES[@]}"; do install -d "/var/spool/slurmd/$n"; done
    if ! live_pid "$CTLD_PID" >/dev/null; then
        log "starting slurmctld"
        slurmctld
    fi
    for n in "${NODES[@]}"; do
        if ! live_pid "/run/slurmd-$n.pid" >/dev/null; then
            log "starting slurmd -N $n"
            slurmd -N "$n"
        fi
    done
}

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) states
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ') || true
        if [[ $states =~ n1\ (idle|mix|alloc) ]] && [[ $states =~ n2\ (idle|mix|alloc) ]]; then
            log "up: $states"
            return 0
        fi
        # a node left DOWN by an earlier unclean stop comes back with `resume`
        if [[ $states =~ (down|drain) ]]; then
            scontrol update NodeName=n1,n2 State=RESUME 2>/dev/null || true
        fi
        sleep 1
    done
    die "nodes not idle after ${WAIT_S}s (sinfo: ${states:-no answer}); see /var/log/slurm/"
}

stop_pid_file() {
    local f=$1 name=$2 pid i
    pid=$(live_pid "$f") || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name did not stop in 10 s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_start() {
    need_root start
    install_packages
    setup_munge
    setup_hosts
    if write_conf; then
        # a new slurm.conf only takes effect after a restart of running daemons
        if live_pid "$CTLD_PID" >/dev/null; then
            log "slurm.conf changed: restarting the SLURM daemons"
            stop_slurm
        fi
    fi
    start_daemons
    wait_idle
}

stop_slurm() {
    local n
    for n in "${NODES[@]}"; do stop_pid_file "/run/slurmd-$n.pid" "slurmd $n"; done
    stop_pid_file "$CTLD_PID" slurmctld
}

cmd_stop() {
    need_root stop
    stop_slurm
    stop_pid_file "$MUNGE_PID" munged
}

cmd_status() {
    local n pid rc=0 name file
    local -a names=(munged slurmctld) files=("$MUNGE_PID" "$CTLD_PID")
    for n in "${NODES[@]}"; do names+=("slurmd $n"); files+=("/run/slurmd-$n.pid"); done
    for i in "${!names[@]}"; do
        if pid=$(live_pid "${files[$i]}"); then
            printf '%-10s running (pid %s)\n' "${names[$i]}" "$pid"
        else
            printf '%-10s stopped\n' "${names[$i]}"
            rc=1
        fi
    done
    sinfo -N 2>/dev/null || rc=1
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
