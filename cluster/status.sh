#!/usr/bin/env bash
# Report on the local Ray cluster that cluster/start.sh started: its nodes, processes and resources.
#
#   cluster/status.sh [--state DIR] [--quiet]
#
# Exit status 0 when the head node is running, 1 when not. --quiet prints nothing.
set -uo pipefail
state=${DPTRAIN_RAY_STATE:-/tmp/dptrain-ray}
quiet=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state) state=$2; shift 2 ;;
    --quiet) quiet=1; shift ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "status.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
say() { [[ $quiet -eq 1 ]] || echo "$@"; }
if [[ ! -f "$state/head.sid" ]] || ! pgrep -s "$(cat "$state/head.sid")" >/dev/null 2>&1; then
  say "no dptrain Ray cluster running from $state"
  exit 1
fi
shopt -s nullglob
for f in "$state"/*.sid; do
  name=$(basename "$f" .sid)
  n=$(pgrep -s "$(cat "$f")" 2>/dev/null | wc -l)
  say "$name: $n process(es)"
done
if [[ $quiet -eq 0 ]]; then
  # shellcheck disable=SC1091
  source "$state/env"
  ray status --address "$RAY_ADDRESS" 2>/dev/null | sed -n '/Node status/,/Pending Demands/p'
fi
exit 0
