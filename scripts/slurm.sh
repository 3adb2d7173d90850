#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to run the cluster code path for real (tests/test_slurm.py, docs/scaling.md):
#   scripts/slurm.sh up     install SLURM if missing, write its config for this host, start it, wait for an idle node
#   scripts/slurm.sh down   stop the daemons (by their pid files); running jobs are killed
# Both are idempotent (`up` starts only what is not running; after a config change, `down` then `up`).
# Debian/Ubuntu, as root (apt-get, daemons). There is no systemd here: daemons start directly.
# On a real cluster none of this is yours to run; docs/scaling.md lists the settings a real one differs in.
set -euo pipefail

ETC=/etc/slurm
RUN=/run/slurm
LOG=/var/log/slurm
HOST=$(hostname -s)
# pid files: munged, MariaDB (for slurmdbd), slurmdbd, slurmctld, slurmd; `down` stops them in reverse order
MUNGE_PID=/run/munge/munged.pid
DB_PID=/run/mysqld/mysqld.pid
PIDS=("$MUNGE_PID" "$DB_PID" "$RUN/slurmdbd.pid" "$RUN/slurmctld.pid" "$RUN/slurmd.pid")

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...: retry COMMAND every second
  local seconds=$1 what=$2
  shift 2
  for ((i = 0; i < seconds; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "slurm.sh: no $what after ${seconds}s; see $LOG/" >&2
  return 1
}

install_packages() {
  # slurmctld + slurmd run the jobs; slurmdbd (with MariaDB behind it) is what `sacct` reads: without a database
  # SLURM 22.05 keeps no job history at all (accounting_storage/filetxt and `sacct --completion` are gone).
  local missing=()
  for cmd in munged slurmctld slurmd slurmdbd sinfo mariadbd; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  [[ ${#missing[@]} -eq 0 ]] && return
  [[ $(id -u) -eq 0 ]] || { echo "slurm.sh: ${missing[*]} missing; run as root to install them" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

write_if_changed() {  # write_if_changed FILE MODE OWNER < content
  local tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm "$tmp"; else install -m "$2" -o "$3" "$tmp" "$1" && rm "$tmp"; fi
}

configure() {
  # This host as the one node: its CPUs, sockets and cores as slurmd detects them, its memory less 1 GiB for the
  # daemons (a node with less memory than configured is drained).
  local node memory
  node=$(slurmd -C | head -1)
  memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node="$(sed 's/ RealMemory=[0-9]*//' <<<"$node") RealMemory=$((memory - 1024)) State=UNKNOWN"
  mkdir -p "$ETC" "$RUN" "$LOG" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld
  chown slurm:slurm "$RUN" "$LOG" /var/spool/slurmctld
  chown munge:munge /run/munge
  chown mysql:mysql /run/mysqld
  write_if_changed "$ETC/slurm.conf" 644 root <<EOF
# Written by scripts/slurm.sh for a one-node test cluster on $HOST.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
# No cgroups here: processes are tracked through /proc and tasks are not pinned. Real clusters use cgroup for both.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# CPUs and memory are consumable: jobs share the node as long as their --cpus-per-task and --mem fit.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Job history for sacct, through slurmdbd
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# A node that went down (e.g. slurmd restarted) comes back by itself
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued: the time a run has to save last.ckpt
KillWait=30
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
$node
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmdbd reaches MariaDB through its socket as the OS user slurm (unix_socket authentication: no password).
  write_if_changed "$ETC/slurmdbd.conf" 600 slurm <<EOF
# Written by scripts/slurm.sh
AuthType=auth/munge
DbdHost=$HOST
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
}

up() {
  install_packages
  configure
  running "$MUNGE_PID" || runuser -u munge -- munged
  if ! running "$DB_PID"; then
    runuser -u mysql -- mariadbd --skip-networking --pid-file="$DB_PID" >>"$LOG/mariadb.log" 2>&1 &
    wait_for 60 "MariaDB" mariadb -e "SELECT 1"
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  fi
  # An account for Optuna studies and MLflow stores on this server (docs/sweeps.md): user and password
  # digit_lightning, owner of every database whose name starts with digit_lightning; reached through the socket.
  mariadb -e "CREATE USER IF NOT EXISTS 'digit_lightning'@'localhost' IDENTIFIED BY 'digit_lightning';
              GRANT ALL ON \`digit_lightning%\`.* TO 'digit_lightning'@'localhost';
              CREATE DATABASE IF NOT EXISTS digit_lightning;"
  if ! running "$RUN/slurmdbd.pid"; then
    slurmdbd
    wait_for 60 "slurmdbd" sacctmgr -n list cluster
  fi
  # The cluster must be known to slurmdbd before slurmctld registers with it
  [[ -n $(sacctmgr -n list cluster local format=cluster) ]] || sacctmgr -i add cluster local >/dev/null
  running "$RUN/slurmctld.pid" || slurmctld
  running "$RUN/slurmd.pid" || slurmd
  wait_for 60 "idle node" bash -c "sinfo -h -N -o %T | grep -qx idle"
  sinfo -N -l
}

down() {
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    local pidfile=${PIDS[i]}
    running "$pidfile" || continue
    local pid
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  done
  echo "SLURM stopped"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
