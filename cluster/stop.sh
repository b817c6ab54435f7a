#!/usr/bin/env bash
# Stop the local Ray cluster that cluster/start.sh started, and only that one.
#
#   cluster/stop.sh [--state DIR]
#
# Each node was started as the leader of its own Unix session; this sends SIGTERM to
# every process of those sessions, waits up to 10 s, then SIGKILLs what is left.
# Other Ray instances on the machine (an embedded ray.init(), another cluster) are untouched.
set -euo pipefail
state=${DPTRAIN_RAY_STATE:-/tmp/dptrain-ray}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state) state=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
for sid in "${sids[@]}"; do pkill -TERM -s "$sid" 2>/dev/null || true; done
for _ in $(seq 1 20); do
  alive=0
  for sid in "${sids[@]}"; do pgrep -s "$sid" >/dev/null 2>&1 && alive=1; done
  [[ $alive -eq 0 ]] && break
  sleep 0.5
done
for sid in "${sids[@]}"; do pkill -KILL -s "$sid" 2>/dev/null || true; done
rm -f "$state"/*.sid "$state/env"
echo "stopped the Ray cluster of $state (${#sids[@]} node(s))"
