#!/usr/bin/env bash
# Start a one-node SLURM cluster on 127.0.0.1 for tests/test_slurm.py (needs root; Debian/Ubuntu).
#
# Idempotent: installs slurm-wlm + munge only when missing, writes its own slurm.conf under the state
# directory (clients find it through SLURM_CONF; since srun inside jobs ignores SLURM_CONF, it is also
# linked as /etc/slurm/slurm.conf when that path is free, never replacing one), starts munged (only when
# no munged runs already), slurmctld and slurmd as root in daemon mode with PID files, and records in
# $STATE/started which daemons it started, so stop-cluster.sh ends only those. A second call while our
# cluster is up only checks it.
# A SLURM that was already running and is not ours is never touched: the script refuses (exit 3).
#
# Usage:  tests/slurm/start-cluster.sh            (then: export SLURM_CONF=$STATE/etc/slurm.conf)
# Env:    SBSSL_SLURM_STATE  state directory        [/tmp/sbssl-slurm]
#         SBSSL_SLURM_MIN_JOB_AGE  MinJobAge seconds; the executor's squeue status mode needs
#                            >= 3x slurm-init-seconds-before-status-checks; finished jobs stay
#                            visible to `squeue -t all` that long (no accounting database) [3600]
# Prints `SLURM_CONF=<path>` as its last line. Exit codes: 0 up, 2 cannot install/start,
# 3 a foreign SLURM daemon or /etc/slurm/slurm.conf is there.
set -euo pipefail

STATE=${SBSSL_SLURM_STATE:-/tmp/sbssl-slurm}
MIN_JOB_AGE=${SBSSL_SLURM_MIN_JOB_AGE:-3600}
CONF=$STATE/etc/slurm.conf
STARTED=$STATE/started

log() { echo "start-cluster: $*" >&2; }
die() { log "ERROR: $1"; exit "${2:-2}"; }

[[ $(id -u) -eq 0 ]] || die "must run as root (slurmctld/slurmd run as root here)"

# A PID file names a live process of the expected program (guards against reused PIDs).
alive() {  # alive <pidfile> <comm>
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$2" ]]
}

wait_for() {  # wait_for <seconds> <description> <command...>
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
  log "$what: ok"
}

# --- install (only when missing) --------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged missing and no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  # apt-get update only when the lists do not know the package yet. (No `| grep -q` under pipefail:
  # grep's early exit would fail the pipeline with SIGPIPE.)
  has_candidate() { [[ $(apt-cache policy slurm-wlm 2>/dev/null) =~ Candidate:\ [0-9] ]]; }
  if ! has_candidate; then
    log "apt-get update"
    timeout 300 apt-get update -qq || die "apt-get update failed"
    has_candidate || die "apt has no candidate for slurm-wlm (apt-cache policy slurm-wlm), even after apt-get update"
  fi
  log "apt-get install slurm-wlm munge"
  timeout 600 apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
fi

mkdir -p "$STATE"/{etc,run,log,spool/ctld,spool/d}
touch "$STARTED"

# --- our cluster already up? ------------------------------------------------------------------
export SLURM_CONF=$CONF
if alive "$STATE/run/slurmctld.pid" slurmctld && alive "$STATE/run/slurmd.pid" slurmd; then
  if [[ $(timeout 10 scontrol ping 2>/dev/null) == *UP* ]]; then
    log "our cluster is already running (state $STATE)"
    echo "SLURM_CONF=$CONF"
    exit 0
  fi
  die "our slurmctld/slurmd run but do not answer; run tests/slurm/stop-cluster.sh, then retry"
fi

# --- never touch a foreign SLURM ---------------------------------------------------------------
for d in slurmctld slurmd; do
  if ! alive "$STATE/run/$d.pid" "$d" && pgrep -x "$d" >/dev/null; then
    die "a $d not started by this script is running (pid $(pgrep -x "$d" | tr '\n' ' ')); refusing to touch it. Stop it yourself or point the tests at it." 3
  fi
done
# Half-started leftovers of ours (one daemon died): stop them so that we start from a clean state.
if [[ -s $STARTED ]] && grep -qE '^(slurmctld|slurmd)$' "$STARTED"; then
  log "cleaning up a partly running cluster of ours"
  SBSSL_SLURM_STATE=$STATE "$(dirname "$0")/stop-cluster.sh" --keep-munge
fi

# --- munge -------------------------------------------------------------------------------------
if pgrep -x munged >/dev/null; then
  log "reusing the running munged (not started by this script)"
else
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
    chown munge:munge /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  # munged refuses to run as root; it daemonizes itself and writes /run/munge/munged.pid.
  timeout 20 runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
    || die "munged did not start (see /var/log/munge/munged.log)"
  echo munged >>"$STARTED"
  log "munged started"
fi
wait_for 15 "munge credential round trip" bash -c 'munge -n | unmunge' \
  || die "munge does not work (munge -n | unmunge failed); see /var/log/munge/munged.log"

# --- slurm.conf --------------------------------------------------------------------------------
HOST=$(hostname -s)
# Hardware as slurmd sees it; RealMemory below the memory available now (slurmd drains a node that
# has less than configured, and we leave room for the other processes of this machine).
HW=$(timeout 20 slurmd -C | head -n1) || die "slurmd -C failed"
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
[[ -n $CPUS ]] || CPUS=$(nproc)
AVAIL_MB=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
MEM_MB=$((AVAIL_MB * 8 / 10))
HWLINE=$(sed -e "s/^NodeName=[^ ]*/NodeName=$HOST NodeAddr=127.0.0.1/" -e "s/RealMemory=[0-9]*/RealMemory=$MEM_MB/" \
  -e 's/ *$//' <<<"$HW")
cat >"$CONF" <<EOF
# Written by tests/slurm/start-cluster.sh: a one-node test cluster on 127.0.0.1 (no cgroups, no
# accounting database: clients must use squeue, not sacct, for job states).
ClusterName=sbssltest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
MinJobAge=$MIN_JOB_AGE
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs without --mem would otherwise hold all the node's memory and run one at a time.
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# One line per finished job: the tests count submissions from it.
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
$HWLINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
log "wrote $CONF ($HWLINE)"

# The SLURM jobstep executor strips SLURM_* variables (SLURM_CONF included) before the `srun` it runs
# inside every job, so that srun only finds the default /etc/slurm/slurm.conf. Link ours there when
# that path is free; a slurm.conf we did not put there is never replaced.
ETC_CONF=/etc/slurm/slurm.conf
if [[ -L $ETC_CONF && "$(readlink "$ETC_CONF")" == "$CONF" ]]; then
  :
elif [[ -e $ETC_CONF || -L $ETC_CONF ]]; then
  die "$ETC_CONF exists and is not ours: jobs' nested srun would read it instead of $CONF; refusing to replace it (move it away to run the test cluster)" 3
else
  mkdir -p /etc/slurm
  ln -s "$CONF" "$ETC_CONF"
  echo etc-link >>"$STARTED"
  log "linked $ETC_CONF -> $CONF"
fi

# --- daemons -----------------------------------------------------------------------------------
timeout 30 slurmctld -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
wait_for 10 "slurmctld pid file" alive "$STATE/run/slurmctld.pid" slurmctld \
  || die "slurmctld exited; see $STATE/log/slurmctld.log"
echo slurmctld >>"$STARTED"
wait_for 30 "slurmctld answers" bash -c 'scontrol ping | grep -q UP' \
  || die "slurmctld does not answer scontrol ping; see $STATE/log/slurmctld.log"

timeout 30 slurmd -f "$CONF" -N "$HOST" || die "slurmd did not start; see $STATE/log/slurmd.log"
wait_for 10 "slurmd pid file" alive "$STATE/run/slurmd.pid" slurmd \
  || die "slurmd exited; see $STATE/log/slurmd.log"
echo slurmd >>"$STARTED"

# A node left down/drained in the saved state of an earlier run comes back to service here.
timeout 10 scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
wait_for 40 "node $HOST idle" bash -c "sinfo -h -N -n '$HOST' -o %T | grep -qE '^(idle|mixed|allocated)'" \
  || die "node $HOST did not become idle: $(sinfo -h -N -o '%N %T %E' 2>&1); see $STATE/log/slurmd.log"
out=$(timeout 60 srun -N1 -n1 -t 1 hostname 2>&1) || die "srun smoke test failed: $out"
log "srun smoke test ran on $out; cluster up (state $STATE)"
echo "SLURM_CONF=$CONF"
