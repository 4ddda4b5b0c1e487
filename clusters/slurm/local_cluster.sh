#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for tests and for trying `medfm launch slurm` on a laptop.
#
#   clusters/slurm/local_cluster.sh start DIR [CPUS]   # writes DIR/slurm.conf, starts the daemons
#   export SLURM_CONF=DIR/slurm.conf                   # then sbatch/squeue/scontrol use it
#   clusters/slurm/local_cluster.sh stop DIR
#
# Needs Debian/Ubuntu's slurm-wlm (`apt-get install -y slurm-wlm`) and root (slurmd launches
# jobs as the submitting user). auth/none: the daemons listen on loopback only and this is a
# throw-away test cluster; a real cluster uses munge.
set -euo pipefail

cmd="${1:?usage: local_cluster.sh start|stop DIR [CPUS]}"
dir="$(mkdir -p "${2:?usage: local_cluster.sh start|stop DIR [CPUS]}" && cd "$2" && pwd)"
cpus="${3:-$(nproc)}"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop() {
  # Wait for each daemon to exit: slurmctld saves its state on the way out.
  for name in slurmd slurmctld; do
    [[ -f "${dir}/${name}.pid" ]] || continue
    pid="$(cat "${dir}/${name}.pid")"
    kill "${pid}" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.2; done
    rm -f "${dir}/${name}.pid"
  done
}

start() {
  for tool in slurmctld slurmd sbatch; do
    command -v "${tool}" >/dev/null || { echo "local_cluster.sh: ${tool} not found; apt-get install -y slurm-wlm" >&2; exit 3; }
  done
  mkdir -p "${dir}/state" "${dir}/spool" "${dir}/log"
  cat > "${dir}/slurm.conf" <<CONF
ClusterName=medfmlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool
SlurmctldPidFile=${dir}/slurmctld.pid
SlurmdPidFile=${dir}/slurmd.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd.log
# No cgroups: containers rarely delegate them; process tracking by /proc is enough here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
# Keep finished jobs visible to scontrol for 10 min (there is no accounting database).
MinJobAge=600
KillWait=10
InactiveLimit=0
SchedulerType=sched/backfill
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="${dir}/slurm.conf"
  # -i: ignore state from an earlier run of the same DIR.
  slurmctld -i
  slurmd -N localhost
  for _ in $(seq 1 30); do
    state="$(sinfo -h -n localhost -o %T 2>/dev/null || true)"
    if [[ "${state}" == idle* ]]; then
      echo "export SLURM_CONF=${SLURM_CONF}"
      return 0
    fi
    sleep 1
  done
  echo "local_cluster.sh: node never became idle (state '${state}'); logs in ${dir}/log" >&2
  tail -n 20 "${dir}/log/slurmctld.log" "${dir}/log/slurmd.log" >&2 || true
  stop
  exit 4
}

case "${cmd}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: local_cluster.sh start|stop DIR [CPUS]" >&2; exit 2 ;;
esac
