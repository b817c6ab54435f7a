#!/usr/bin/env bash
# Report on the local Ray cluster that cluster/start.sh started: its nodes, processes and resources.
#
#   cluster/status.sh [--state DIR] [--quiet] [--agent-only]
#
# Exit status 0 when the head node is running and its job agent serves (job submission
# works), 1 when not. --quiet prints nothing; --agent-only checks only the job agent, quietly.
set -uo pipefail
state=${DPTRAIN_RAY_STATE:-/tmp/dptrain-ray}
quiet=0
agent_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state) state=$2; shift 2 ;;
    --quiet) quiet=1; shift ;;
    --agent-only) agent_only=1; quiet=1; shift ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "status.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
say() { [[ $quiet -eq 1 ]] || echo "$@"; }
agent_serves() {  # the head's job agent accepts connections on the port start.sh gave it
  local p
  p=$(cat "$state/agent_port" 2>/dev/null) || return 1
  python3 -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2).close()" \
    "$p" 2>/dev/null
}
if [[ $agent_only -eq 1 ]]; then
  agent_serves
  exit $?
fi
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
if agent_serves; then
  say "job agent: serving on port $(cat "$state/agent_port")"
else
  say "job agent: NOT serving (scripts/submit.sh will fail; restart the cluster: cluster/stop.sh, cluster/start.sh)"
  exit 1
fi
if [[ $quiet -eq 0 ]]; then
  # shellcheck disable=SC1091
  source "$state/env"
  ray status --address "$RAY_ADDRESS" 2>/dev/null | sed -n '/Node status/,/Pending Demands/p'
fi
exit 0
