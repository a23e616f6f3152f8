#!/usr/bin/env bash
# Stop the daemons that tests/slurm/start-cluster.sh started (listed in $STATE/started), by their
# PID files, and nothing else. Safe to call when nothing runs.
#
# Usage:  tests/slurm/stop-cluster.sh [--keep-munge] [--purge]
#         --keep-munge  leave a munged we started running (used by start-cluster.sh's restart)
#         --purge       also delete the state directory (config, logs, saved job state)
# Env:    SBSSL_SLURM_STATE  state directory [/tmp/sbssl-slurm]
set -euo pipefail

STATE=${SBSSL_SLURM_STATE:-/tmp/sbssl-slurm}
STARTED=$STATE/started
KEEP_MUNGE=0
PURGE=0
for arg in "$@"; do
  case $arg in
    --keep-munge) KEEP_MUNGE=1 ;;
    --purge) PURGE=1 ;;
    *) echo "stop-cluster: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "stop-cluster: $*" >&2; }

stop() {  # stop <name> <pidfile>: TERM, wait up to 20 s, then KILL; only if the PID is that program
  local name=$1 pidfile=$2 pid
  if [[ ! -s $pidfile ]]; then
    log "$name: no PID file $pidfile (not running)"
    return 0
  fi
  pid=$(<"$pidfile")
  if ! [[ $pid =~ ^[0-9]+$ ]] || [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" != "$name" ]]; then
    log "$name: PID file names no running $name (stale), removing it"
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 40); do
    [[ -d /proc/$pid ]] || break
    sleep 0.5
  done
  if [[ -d /proc/$pid ]]; then
    log "$name (pid $pid) ignored SIGTERM for 20 s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  log "$name (pid $pid) stopped"
}

if [[ -f $STARTED ]]; then
  # Reverse start order: slurmd, slurmctld, then munged.
  grep -qx slurmd "$STARTED" && stop slurmd "$STATE/run/slurmd.pid"
  grep -qx slurmctld "$STARTED" && stop slurmctld "$STATE/run/slurmctld.pid"
  if grep -qx munged "$STARTED"; then
    if ((KEEP_MUNGE)); then
      keep=munged
    else
      stop munged /run/munge/munged.pid
    fi
  fi
  if grep -qx etc-link "$STARTED"; then
    # Only the link start-cluster.sh made, and only while it still points at our config.
    if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$STATE/etc/slurm.conf" ]]; then
      rm -f /etc/slurm/slurm.conf
      log "removed the /etc/slurm/slurm.conf link"
    fi
  fi
  echo -n "${keep:+$keep$'\n'}" >"$STARTED"
else
  log "nothing recorded in $STARTED; nothing to stop"
fi
if ((PURGE)); then
  rm -rf "$STATE"
  log "removed $STATE"
fi
