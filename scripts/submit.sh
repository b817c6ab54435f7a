#!/usr/bin/env bash
# Submit a training run to a Ray cluster as a job (`ray job submit`), wait for it, say where results are.
#
#   scripts/submit.sh -- --dataset mnist1d --workers 4 --epochs 10
#   scripts/submit.sh --address http://127.0.0.1:8265 --results /data/runs --no-wait -- --workers 8
#
# Options (before the --; everything after it goes to `dptrain train`):
#   --address URL    the cluster's dashboard / job server (default: $RAY_API_SERVER_ADDRESS,
#                    else http://127.0.0.1:8265, the address cluster/start.sh prints)
#   --results DIR    where the job writes its run folder, on the head node
#                    (default: $DPTRAIN_RESULTS, else ~/dptrain-runs)
#   --id NAME        the job's submission id (default: dptrain-<date>-<time>)
#   --entry FILE     the script the job runs: scripts/train.py (default) or scripts/scale.py
#   --no-wait        submit and return; follow with `ray job logs -f <id>`
#
# The working directory (this repository) is uploaded to the cluster without
# virtual environments, caches, git data or results: Ray copies it to every node.
# Ray 2.60 clusters use token authentication: RAY_AUTH_MODE=token is set here,
# and the token is read from ~/.ray/auth_token (or $RAY_AUTH_TOKEN).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
address=${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}
results=${DPTRAIN_RESULTS:-$HOME/dptrain-runs}
id="dptrain-$(date +%Y%m%d-%H%M%S)-$$"
wait_flag=()
entry=scripts/train.py

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --id) id=$2; shift 2 ;;
    --entry) entry=$2; shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "submit.sh: unknown option $1 (train flags go after --; see --help)" >&2; exit 2 ;;
  esac
done

if ! command -v ray >/dev/null 2>&1; then
  echo "submit.sh: the ray command is not on PATH (activate the environment that has Ray)" >&2
  exit 2
fi

[[ -f "$root/$entry" ]] || { echo "submit.sh: --entry $entry: no such script in $root" >&2; exit 2; }
extra=()
[[ "$entry" == *train.py ]] && extra=(--no-progress)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
out="$results/$id"
runtime_env=$(cat <<JSON
{"excludes": [".git", ".venv", ".venv*", "venv", "venv*", "env", "**/__pycache__", "*.pyc", ".pytest_cache",
              "*.egg-info", "build", "dist", "runs", "results", ".device", ".whl", ".gl"]}
JSON
)

echo "submitting $id to $address (results: $out on the head node)"
status=0
ray job submit --address "$address" --submission-id "$id" --working-dir "$root" \
  --runtime-env-json "$runtime_env" "${wait_flag[@]}" -- \
  python "$entry" --out "$out" "${extra[@]}" "$@" || status=$?

if [[ ${#wait_flag[@]} -gt 0 ]]; then
  echo "submitted: follow with  RAY_AUTH_MODE=token ray job logs --address $address -f $id"
  echo "results will be in $out on the head node"
  exit $status
fi
job_status=$(ray job status --address "$address" "$id" 2>&1 | grep -io "succeeded\|failed\|stopped" | tail -n 1 | tr a-z A-Z || true)
echo "job $id: ${job_status:-unknown}"
echo "results: $out"
if [[ $status -eq 0 && "$job_status" != "SUCCEEDED" ]]; then
  status=1
fi
exit $status
