#!/usr/bin/env bash
# Stop the local Ray cluster that cluster/start.sh started, and only that one.
#
#   cluster/stop.sh [--state DIR]
#
# Each node was started as the leader of its own Unix session; this sends SIGTERM to
# every process of those sessions, waits up to 3 s, SIGKILLs what is left (Ray's graceful
# shutdown of the GCS and raylet takes about 11 s here, for a cluster that is going away),
# and returns once no process of them is alive. Other Ray instances on the machine (an
# embedded ray.init(), another cluster) are untouched.
set -euo pipefail
state=${DPTRAIN_RAY_STATE:-/tmp/dptrain-ray}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state) state=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stop.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
shopt -s nullglob
sids=()
for f in "$state"/*.sid; do
  sid=$(cat "$f")
  [[ $sid =~ ^[0-9]+$ ]] && sids+=("$sid")
done
if [[ ${#sids[@]} -eq 0 ]]; then
  echo "no cluster recorded in $state"
  exit 0
fi
alive() {  # processes of the sessions that are still running (zombies are gone, only not yet reaped)
  local sid n=0
  for sid in "${sids[@]}"; do
    n=$((n + $(ps -o stat= -s "$sid" 2>/dev/null | grep -vc '^Z' || true)))
  done
  echo "$n"
}
wait_gone() {  # up to $1 tenths of a second
  for _ in $(seq 1 "$1"); do
    [[ $(alive) -eq 0 ]] && return 0
    sleep 0.1
  done
  return 1
}
for sid in "${sids[@]}"; do pkill -TERM -s "$sid" 2>/dev/null || true; done
if ! wait_gone 30; then
  for sid in "${sids[@]}"; do pkill -KILL -s "$sid" 2>/dev/null || true; done
  if ! wait_gone 50; then
    echo "stop.sh: $(alive) process(es) of the cluster of $state are still running after SIGKILL" >&2
    exit 1
  fi
fi
rm -f "$state"/*.sid "$state/env"
echo "stopped the Ray cluster of $state (${#sids[@]} node(s))"
