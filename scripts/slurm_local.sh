#!/usr/bin/env bash
# A throw-away SLURM cluster on the local machine, for the tests and for trying `deepres submit`.
#
#   scripts/slurm_local.sh install   install the Debian packages (slurmctld slurmd slurm-client munge)
#   scripts/slurm_local.sh start     install if missing, write the config, start munged, slurmctld and
#                                    NODES slurmd's; prints the `export SLURM_CONF=...` line to use
#   scripts/slurm_local.sh stop      cancel this cluster's jobs, stop exactly the daemons `start` started
#   scripts/slurm_local.sh status    which of those daemons run, and `sinfo`
#
# Environment (all optional):
#   DEEPRES_SLURM_DIR   config, state, logs and pid files   (default: <repo>/.slurm, gitignored)
#   NODES               emulated nodes node1..nodeN          (default: 2)
#   CPUS_PER_NODE       CPUs each node advertises            (default: nproc)
#   SLURM_LOCAL_PORT    slurmctld port; slurmd's use the next NODES ports   (default: 16817)
#   SLURM_LOCAL_AUTH    munge | none                          (default: munge)
#
# Needs root (slurmd runs job steps as their user) and no systemd. What makes it work, measured on
# Debian 12 / Slurm 22.05: proctrack/linuxproc + task/none (no cgroups), no accounting, munged with our
# own key and a socket directory of mode 711, several `slurmd -N nodeX` on 127.0.0.1 with
# SlurmdParameters=config_overrides (each advertises the CPUs written here), and cred_expire lowered so
# a requeued job restarts after seconds instead of 120 s.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${DEEPRES_SLURM_DIR:-$REPO/.slurm}
NODES=${NODES:-2}
CPUS_PER_NODE=${CPUS_PER_NODE:-$(nproc)}
PORT=${SLURM_LOCAL_PORT:-16817}
AUTH=${SLURM_LOCAL_AUTH:-munge}
CONF=$DIR/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "[slurm_local] $*" >&2; }
die() { say "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------- install
packages_missing() {
  local p
  for p in "${PACKAGES[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || return 0
  done
  return 1
}

cmd_install() {
  packages_missing || { say "packages already installed: ${PACKAGES[*]}"; return 0; }
  [[ $EUID -eq 0 ]] || die "installing needs root: sudo $0 install"
  command -v apt-get >/dev/null || die "no apt-get here; install ${PACKAGES[*]} with your package manager"
  say "apt-get update && apt-get install ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# ----------------------------------------------------------------------------------------------- config
write_config() {
  mkdir -p "$DIR"/{state,log,spool,run}
  local mem_mb node_mem_mb i auth_lines
  mem_mb=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
  node_mem_mb=$(( mem_mb / NODES ))
  if [[ $AUTH == munge ]]; then
    # cred_expire: how long slurmctld holds a requeued job back (default 120 s).
    auth_lines="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5"
  else
    auth_lines="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5"
  fi
  {
    cat <<EOF
# Written by scripts/slurm_local.sh; rewritten on every start.
ClusterName=deepres-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
$auth_lines
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no accounting: works in a container without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Each slurmd advertises the CPUs and memory written below, not what it detects.
SlurmdParameters=config_overrides
ReturnToService=2
# Fast turn-around for tests: schedule every second, kill 5 s after SIGTERM, keep finished
# jobs visible to "scontrol show job" for 10 minutes.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MessageTimeout=10
KillWait=5
MinJobAge=600
InactiveLimit=0
Waittime=0
SlurmdTimeout=120
SlurmctldTimeout=30
JobRequeue=1
EOF
    for (( i = 1; i <= NODES; i++ )); do
      echo "NodeName=node$i NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$(( PORT + i )) CPUs=$CPUS_PER_NODE RealMemory=$node_mem_mb State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$CONF"
}

# ------------------------------------------------------------------------------------ process tracking
# A pid file counts only while its pid is alive AND runs the program we started (pids get reused).
alive() {  # alive PIDFILE PROGRAM
  local pid
  [[ -s "$1" ]] || return 1
  pid=$(<"$1")
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_runs "$pid" "$2"
}

stop_pidfile() {  # stop_pidfile PIDFILE PROGRAM
  local pid i
  if ! alive "$1" "$2"; then rm -f "$1"; return 0; fi
  pid=$(<"$1")
  kill -TERM "$pid" 2>/dev/null || true
  # Wait on the process, not its pid file: daemons delete the file before they are done exiting.
  for (( i = 0; i < 100; i++ )); do
    pid_runs "$pid" "$2" || { rm -f "$1"; return 0; }
    sleep 0.1
  done
  say "$2 (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$1"
}

pid_runs() {  # pid_runs PID PROGRAM: alive and not a zombie
  [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$(( SECONDS + $1 )) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { say "timed out waiting for $what"; return 1; }
    sleep 0.2
  done
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ------------------------------------------------------------------------------------------------ start
start_munge() {
  local m=$DIR/munge
  # munged checks permissions: private key 0600, socket directory not writable by others.
  mkdir -p "$m"
  chmod 711 "$m"
  if [[ ! -s $m/munge.key ]]; then
    (umask 077; dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none)
  fi
  chmod 600 "$m/munge.key"
  alive "$m/munged.pid" munged && return 0
  munged --force --socket="$m/munge.socket" --key-file="$m/munge.key" --pid-file="$m/munged.pid" \
    --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
    || die "munged did not start; see $m/munged.log"
  wait_for 10 "munged" alive "$m/munged.pid" munged || die "munged did not start; see $m/munged.log"
}

cmd_start() {
  [[ $EUID -eq 0 ]] || die "run as root (slurmd must start job steps as their user): sudo $0 start"
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "NODES=$NODES: give a positive integer"
  cmd_install
  if alive "$DIR/run/slurmctld.pid" slurmctld; then
    say "already running (slurmctld pid $(<"$DIR/run/slurmctld.pid")); '$0 stop' first to reconfigure"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  local i
  for (( i = 0; i <= NODES; i++ )); do
    port_free $(( PORT + i )) || die "port $(( PORT + i )) is in use; choose another with SLURM_LOCAL_PORT=..."
  done
  [[ $AUTH == munge || $AUTH == none ]] || die "SLURM_LOCAL_AUTH=$AUTH: use munge or none"
  write_config
  export SLURM_CONF=$CONF
  # A start that fails half-way stops what it had started (die exits through this trap).
  trap 'say "start failed; stopping the daemons it started"; cmd_stop' EXIT
  if [[ $AUTH == munge ]]; then start_munge; fi
  # -i: ignore state files that do not match this config (a previous run with other NODES).
  slurmctld -i || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  wait_for 10 "slurmctld" alive "$DIR/run/slurmctld.pid" slurmctld \
    || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  for (( i = 1; i <= NODES; i++ )); do
    slurmd -N "node$i" || die "slurmd node$i did not start; see $DIR/log/slurmd-node$i.log"
  done
  for (( i = 1; i <= NODES; i++ )); do
    wait_for 10 "slurmd node$i" alive "$DIR/run/slurmd-node$i.pid" slurmd \
      || die "slurmd node$i did not start; see $DIR/log/slurmd-node$i.log"
  done
  # Nodes that were DOWN in saved state come back with ReturnToService=2, but only once registered.
  wait_for 20 "nodes to register" nodes_idle || die "nodes did not come up; see $DIR/log/"
  trap - EXIT
  say "cluster up: $NODES node(s) x $CPUS_PER_NODE CPUs, partition 'local'. Clients need:"
  echo "export SLURM_CONF=$CONF"
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%T' 2>/dev/null) || return 1
  [[ -n $states ]] && ! grep -qvE '^(idle|mixed|allocated)' <<<"$states"
}

# ------------------------------------------------------------------------------------------------- stop
cmd_stop() {
  export SLURM_CONF=$CONF
  local i f
  if alive "$DIR/run/slurmctld.pid" slurmctld; then
    # Jobs were started by our slurmd's: cancel them so no training process outlives the cluster.
    local jobs
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      say "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      wait_for 30 "jobs to end" no_jobs || true
    fi
  fi
  for f in "$DIR"/run/slurmd-*.pid; do
    [[ -e $f ]] && stop_pidfile "$f" slurmd
  done
  stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
  stop_pidfile "$DIR/munge/munged.pid" munged
  say "stopped"
}

no_jobs() { [[ -z "$(squeue -h -o '%i' 2>/dev/null)" ]]; }

# ----------------------------------------------------------------------------------------------- status
cmd_status() {
  local f name rc=0
  for f in "$DIR/munge/munged.pid" "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd-*.pid; do
    [[ -e $f ]] || continue
    name=$(basename "$f" .pid)
    if alive "$f" "${name%%-*}"; then echo "$name: running (pid $(<"$f"))"; else echo "$name: not running"; rc=1; fi
  done
  if ! alive "$DIR/run/slurmctld.pid" slurmctld; then
    echo "slurmctld: not running (start with: $0 start)"
    return 1
  fi
  SLURM_CONF=$CONF sinfo -N
  echo "export SLURM_CONF=$CONF"
  return $rc
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|start|stop|status   (see the top of this file)" >&2; exit 2 ;;
esac
