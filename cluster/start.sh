#!/usr/bin/env bash
# Start a local Ray cluster with `ray start`: a head node and, optionally, worker nodes on this machine.
#
#   cluster/start.sh                  # a head node
#   cluster/start.sh --nodes 2        # a head node and 2 worker nodes, each with its own ports
#   source /tmp/dptrain-ray/env       # then: dptrain train --address auto ... ; scripts/submit.sh -- ...
#
# Options:
#   --nodes K             extra worker nodes on this machine (default 0); node k gets the custom
#                         resource node_k, so tests and experiments can pin work to it
#   --cpus N              logical CPUs of the head node (default: this machine's count)
#   --node-cpus N         logical CPUs of each worker node (default 1)
#   --port P              the head's GCS port (default 6379)
#   --dashboard-port P    dashboard and job server, bound to 127.0.0.1 only (default 8265)
#   --state DIR           where the cluster's state and Ray's session files go (default /tmp/dptrain-ray)
#
# Security: Ray 2.60 turns token authentication on for `ray start` clusters (the token is in
# ~/.ray/auth_token; clients need it, and RAY_AUTH_MODE=token where Ray cannot infer it).
# The dashboard and job server listen on 127.0.0.1 only. Each node runs in its own Unix
# session, so cluster/stop.sh stops exactly the processes this script started.
set -euo pipefail

nodes=0
cpus=$(nproc)
node_cpus=1
port=6379
dash_port=8265
state=${DPTRAIN_RAY_STATE:-/tmp/dptrain-ray}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --node-cpus) node_cpus=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dashboard-port) dash_port=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "start.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in nodes cpus node_cpus port dash_port; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "start.sh: --${v//_/-} must be a whole number, got '${!v}'" >&2; exit 2; }
done
command -v ray >/dev/null || { echo "start.sh: the ray command is not on PATH (activate the environment with Ray)" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
if [[ -f "$state/env" ]] && "$here/status.sh" --state "$state" --quiet; then
  echo "start.sh: a cluster from $state is already running (cluster/stop.sh --state $state stops it)" >&2
  exit 2
fi
mkdir -p "$state"
rm -f "$state"/*.sid "$state/env"
# Ray writes a session folder of logs at every start: keep the last stopped cluster's (for a
# post-mortem), not the ones before it, so the state folder does not grow start after start.
{ ls -dt "$state"/ray/session_2* 2>/dev/null || true; } | tail -n +2 | xargs -r rm -rf

# Run `ray start` as the leader of a new session and record the session id: every Ray process
# of that node inherits it, which is how stop.sh finds them (and nothing else).
start_node() {  # name, then ray start arguments
  local name=$1; shift
  if ! setsid bash -c 'echo $$ > "$0"; exec ray start "$@"' "$state/$name.sid" "$@" \
      > "$state/$name.log" 2>&1 < /dev/null; then
    echo "start.sh: ray start failed for the $name node; its output is in $state/$name.log:" >&2
    tail -n 5 "$state/$name.log" >&2
    "$here/stop.sh" --state "$state" >/dev/null 2>&1 || true
    exit 1
  fi
}

# The head's agents get ports found free now, not Ray's defaults: if anything holds the default
# job-agent port (another Ray instance, an orphaned agent), Ray would start the cluster with job
# submission disabled and say so only in a log file. Not the ports given for the GCS and the
# dashboard either: a caller's port found free a moment ago may come up again here.
read -r agent_port agent_grpc metrics_port env_agent_port < <(python3 - "$port" "$dash_port" <<'PY'
import socket, sys
taken, socks = {int(p) for p in sys.argv[1:]}, []
while len(socks) < 4:
    s = socket.socket()
    s.bind(("", 0))
    if s.getsockname()[1] in taken:
        s.close()
        continue
    socks.append(s)
print(*[s.getsockname()[1] for s in socks])
PY
)
echo "$agent_port" > "$state/agent_port"
start_node head --head --port "$port" --temp-dir "$state/ray" --num-cpus "$cpus" \
  --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" --disable-usage-stats \
  --dashboard-agent-listen-port "$agent_port" --dashboard-agent-grpc-port "$agent_grpc" \
  --metrics-export-port "$metrics_port" --runtime-env-agent-port "$env_agent_port"
# Ray writes the cluster's token with the default umask (0644): whoever reads it joins the
# cluster and runs code on it. This user's only.
token=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
[[ -f "$token" ]] && chmod 600 "$token" && chmod 700 "$(dirname "$token")"
ip=$(grep -o "ray start --address='[^']*'" "$state/head.log" | head -n 1 | sed "s/.*='\(.*\)'/\1/")
[[ -n "$ip" ]] || ip="$(hostname -I | awk '{print $1}'):$port"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
for k in $(seq 1 "$nodes"); do
  base=$((port + 1000 + 20 * k))
  start_node "node-$k" --address "$ip" --temp-dir "$state/ray" --num-cpus "$node_cpus" \
    --resources "{\"node_$k\": 1}" --node-manager-port "$base" --object-manager-port $((base + 1)) \
    --dashboard-agent-listen-port $((base + 2)) --dashboard-agent-grpc-port $((base + 3)) \
    --metrics-export-port $((base + 4)) --runtime-env-agent-port $((base + 5)) \
    --min-worker-port $((20000 + 1000 * k)) --max-worker-port $((20000 + 1000 * k + 999)) --disable-usage-stats
done

# the cluster is up only once its job agent serves (scripts/submit.sh needs it)
for _ in $(seq 1 60); do
  "$here/status.sh" --state "$state" --agent-only && break
  sleep 0.5
done
if ! "$here/status.sh" --state "$state" --agent-only; then
  echo "start.sh: the head's job agent is not serving on port $agent_port after 30 s, so jobs could not be" \
       "submitted; its log: $state/ray/session_latest/logs/dashboard_agent.log. Stopping the cluster." >&2
  "$here/stop.sh" --state "$state" >/dev/null 2>&1 || true
  exit 1
fi

cat > "$state/env" <<ENV
export RAY_ADDRESS=$ip
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash_port
export RAY_AUTH_MODE=token
ENV
echo "Ray cluster up: head at $ip with $cpus CPUs, $nodes worker node(s) with $node_cpus CPU(s) each"
echo "  dashboard and jobs: http://127.0.0.1:$dash_port (this machine only)"
echo "  train:  dptrain train --address auto --workers 2"
echo "  submit: scripts/submit.sh --address http://127.0.0.1:$dash_port -- --workers 2"
state_flag=$( [[ $state != /tmp/dptrain-ray ]] && echo " --state $state" || true)
echo "  status: cluster/status.sh$state_flag   stop: cluster/stop.sh$state_flag"
echo "  (source $state/env to set RAY_ADDRESS and friends for other tools)"
