#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost (Debian, as root): munge, slurmctld, slurmd with
# .ci/slurm/*.conf. Idempotent: installs the packages only when missing, starts only the daemons
# that are not running, and restarts them when the configuration changed. Exits 0 once the node
# is idle; non-zero (with the log files named) when it cannot be started.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
conf_dir=/etc/slurm

if [ "$(id -u)" != 0 ]; then
  echo "start-slurm: needs root (installs packages, runs slurmctld/slurmd as root)" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

mkdir -p "$conf_dir" /var/spool/slurmd /var/spool/slurmctld /run/munge /var/log
# The node's CPUs and memory: this machine's (80% of RAM), but at least a GPU node's 8 CPUs and
# 64 GB so that profiles/slurm's requests can be scheduled (see the comment in slurm.conf).
cpus=$(nproc); [ "$cpus" -ge 8 ] || cpus=8
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 )); [ "$mem" -ge 64000 ] || mem=64000
new_conf=$(mktemp)
sed -e "s/^NodeName=localhost CPUs=[0-9]* RealMemory=[0-9]*/NodeName=localhost CPUs=$cpus RealMemory=$mem/" \
  "$here/slurm/slurm.conf" > "$new_conf"
changed=0
cmp -s "$new_conf" "$conf_dir/slurm.conf" || changed=1
cmp -s "$here/slurm/gres.conf" "$conf_dir/gres.conf" || changed=1
install -m 644 "$new_conf" "$conf_dir/slurm.conf"
install -m 644 "$here/slurm/gres.conf" "$conf_dir/gres.conf"
rm -f "$new_conf"

[ -f /etc/munge/munge.key ] || mungekey -c
chown munge:munge /etc/munge/munge.key /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

stop_daemon() {  # stop_daemon NAME PIDFILE: the daemon this script started, by its pid file
  local pid
  pid=$(cat "$2" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
}
if [ "$changed" = 1 ]; then
  stop_daemon slurmd /var/run/slurmd.pid
  stop_daemon slurmctld /var/run/slurmctld.pid
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|allocated"; then
    # A node left DOWN/DRAIN by an earlier run comes back with ReturnToService=2; make sure.
    sinfo -h -o %T | grep -qE "down|drain" && scontrol update NodeName=localhost State=RESUME || true
    sinfo
    exit 0
  fi
  sinfo -h -o %T 2>/dev/null | grep -qE "down|drain" && scontrol update NodeName=localhost State=RESUME 2>/dev/null || true
  sleep 1
done
echo "start-slurm: SLURM did not come up; see /var/log/slurmctld.log and /var/log/slurmd.log" >&2
exit 1
