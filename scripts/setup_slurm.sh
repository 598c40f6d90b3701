#!/usr/bin/env bash
# A one-node Slurm on this machine (slurmctld and slurmd, munge, PMIx) for the test of
# `mpicaffe launch --launcher srun` (tests/fault/test_launch_hosts.py). Installs Debian's
# slurm-wlm with apt-get (seconds from a mirror), writes /etc/slurm/slurm.conf where there is
# none, and starts the daemons unless a controller already answers. Best effort, as
# scripts/setup_containers.sh: where it cannot (not root, no apt-get), it says so and exits 0; the
# test then skips, except in CI (CI=1), where it fails.
set -euo pipefail

if command -v sinfo >/dev/null && sinfo -h -o %T 2>/dev/null | grep -Eq 'idle|mix|alloc'; then
  exit 0   # a controller answers and has a node up
fi
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "setup_slurm: no running Slurm and none installable here (needs root and apt-get)" >&2
  exit 0
fi
log="$(mktemp /tmp/setup_slurm.XXXXXX.log)"
# libpmix-dev: Slurm's mpi/pmix plugin opens libpmix.so, the unversioned name only it installs
if ! command -v slurmctld >/dev/null || [[ ! -e /usr/lib/x86_64-linux-gnu/libpmix.so ]]; then
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
           slurm-wlm munge libpmix-dev; } >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    echo "setup_slurm: apt-get could not install slurm-wlm, munge and libpmix-dev (log: $log)" >&2
    exit 0
  fi
fi

node="$(hostname -s)"
if [[ ! -e /etc/slurm/slurm.conf ]]; then
  mkdir -p /etc/slurm
  # 4 CPUs whatever the machine has (config_overrides), so 2- and 3-rank tests fit on 2 cores
  cat >/etc/slurm/slurm.conf <<CONF
# written by mpicaffe's scripts/setup_slurm.sh: one node, this machine, for tests
ClusterName=mpicaffe-test
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
# srun sends SIGTERM, then SIGKILL after KillWait s, to the ranks left when one dies (Slurm's
# default 30 s): they are blocked in a collective with the dead rank, so only SIGKILL ends them
KillWait=2
MpiDefault=none
NodeName=$node CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
  # the PMIx of Open MPI's pip wheel has no munge security plugin: ranks use the native one
  echo "PMIxEnv=PMIX_MCA_psec=native" >/etc/slurm/mpi.conf
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/log/munge
chown munge: /run/munge /var/log/munge 2>/dev/null || true
pgrep -x munged >/dev/null || munged --force 2>>"$log" || runuser -u munge -- munged 2>>"$log"
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -Eq 'idle|mix|alloc'; then
    echo "setup_slurm: $(sinfo -V), one node ($node) up"
    rm -f "$log"
    exit 0
  fi
  sleep 0.5
done
echo "setup_slurm: the node did not come up (logs in /var/log/slurm, $log)" >&2
