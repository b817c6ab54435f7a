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
# A --model or --loss given as path/to/file.py:function must lie inside it; the path
# is rewritten relative to it (the job runs there), so it may be given from anywhere.
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
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "submit.sh: unknown option $1 (train flags go after --; see --help)" >&2; exit 2 ;;
  esac
done

if ! command -v ray >/dev/null 2>&1; then
  echo "submit.sh: the ray command is not on PATH (activate the environment that has Ray)" >&2
  exit 2
fi

[[ -f "$root/$entry" ]] || { echo "submit.sh: --entry $entry: no such script in $root" >&2; exit 2; }

# file.py:function references, as the job will see them: relative to the uploaded root
reference() {  # FLAG VALUE -> the value to pass on
  local flag=$1 value=$2 file fn abs
  if [[ $value != *.py:* ]]; then echo "$value"; return 0; fi
  file=${value%:*}; fn=${value##*:}
  if [[ ! -f $file ]]; then echo "submit.sh: $flag $value: file $file not found" >&2; return 2; fi
  abs="$(cd "$(dirname "$file")" && pwd)/$(basename "$file")"
  case $abs in
    "$root"/*) echo "${abs#"$root"/}:$fn" ;;
    *) echo "submit.sh: $flag $value: $abs is outside the directory uploaded to the cluster ($root);" \
            "put the file inside it" >&2; return 2 ;;
  esac
}
train_args=()
pending=""
for arg in "$@"; do
  if [[ -n $pending ]]; then
    arg=$(reference "$pending" "$arg") || exit 2
    pending=""
  elif [[ $arg == --model || $arg == --loss ]]; then
    pending=$arg
  elif [[ $arg == --model=* || $arg == --loss=* ]]; then
    value=$(reference "${arg%%=*}" "${arg#*=}") || exit 2
    arg="${arg%%=*}=$value"
  fi
  train_args+=("$arg")
done

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
  python "$entry" --out "$out" "${extra[@]}" "${train_args[@]}" || status=$?

if [[ ${#wait_flag[@]} -gt 0 ]]; then
  echo "submitted: follow with  RAY_AUTH_MODE=token ray job logs --address $address -f $id"
  echo "results will be in $out on the head node"
  exit $status
fi
status_text=$(ray job status --address "$address" "$id" 2>&1 || true)
if [[ $status -ne 0 ]] && grep -q "does not exist" <<<"$status_text"; then
  echo "submit.sh: the cluster at $address did not accept job $id (the error is above): nothing ran, no results." >&2
  echo "  Is its job agent serving? cluster/status.sh tells, for a cluster from cluster/start.sh." >&2
  exit 1
fi
job_status=$(grep -io "succeeded\|failed\|stopped" <<<"$status_text" | tail -n 1 | tr a-z A-Z || true)
echo "job $id: ${job_status:-unknown}"
echo "results: $out"
if [[ $status -eq 0 && "$job_status" != "SUCCEEDED" ]]; then
  status=1
fi
exit $status
