#!/usr/bin/env bash
# Submit N Optuna workers for one study as a SLURM job array; each runs `python -m bench.tune` on the shared storage.
#
#   TUNE_STORAGE=postgresql://USER@HOST:5432/DB scripts/slurm/submit_tune_workers.sh N STUDY [bench.tune overrides...]
#   TUNE_STORAGE=postgresql://hg@db01:5432/optuna scripts/slurm/submit_tune_workers.sh 8 adam-mlp \
#       optimizer=adam tune.n_trials=200
#
# The workers share tune.n_trials: together they run exactly that many trials (bench.tune keeps the count exact),
# and submitting again continues the study. A worker that dies mid-trial leaves that trial FAIL (Optuna's
# heartbeat); the others go on. A worker that is preempted is requeued by SLURM and rejoins the study.
#
# TUNE_STORAGE must be reachable from every node: PostgreSQL (or journal:PATH on a shared filesystem). It is passed
# through the job's environment, never written into the job script; keep the password in ~/.pgpass rather than in
# the URL. Worker logs and run directories: $TUNE_ROOT/STUDY/worker_<i>/ (default TUNE_ROOT: outputs/tune).
# Resources per worker: WORKER_GPUS (1), WORKER_CPUS (4), WORKER_MEM (16G), WORKER_TIME_MIN (240); site settings
# (partition, account, qos, ...) come from bench/conf/local/slurm.yaml like the sweep launcher's; SBATCH_ARGS adds any
# other sbatch option. Environment: PYTHON (default: the repository's .venv/bin/python).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
fi
if [[ $# -lt 2 ]]; then
    echo "usage: TUNE_STORAGE=URL $0 N STUDY [bench.tune overrides...]" >&2
    exit 2
fi
workers="$1"
study="$2"
shift 2
if [[ ! "$workers" =~ ^[1-9][0-9]*$ ]]; then
    echo "N must be a positive number of workers, but got '$workers'" >&2
    exit 2
fi
if [[ ! "$study" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "STUDY must be letters, digits, '.', '_' or '-', but got '$study'" >&2
    exit 2
fi
if [[ -z "${TUNE_STORAGE:-}" ]]; then
    echo "TUNE_STORAGE must be a storage every node reaches (postgresql://... or journal:PATH), but it is not set" >&2
    exit 2
fi
if [[ "$TUNE_STORAGE" == sqlite:* ]]; then
    echo "TUNE_STORAGE must be shared by workers on several nodes, but got an SQLite file; use PostgreSQL" >&2
    exit 2
fi

python="${PYTHON:-$repo/.venv/bin/python}"
study_dir="$(realpath -m "${TUNE_ROOT:-outputs/tune}/$study")"
mkdir -p "$study_dir"
# partition/account/qos... from the git-ignored site file, as sbatch options.
site_options="$("$python" -m bench.cluster sbatch-options "$repo/bench/conf/local/slurm.yaml")"
site=()
if [[ -n "$site_options" ]]; then
    mapfile -t site <<<"$site_options"
fi

# Single quotes: TUNE_STORAGE and the array index are expanded inside the job, so the URL stays out of the script.
# One torch thread per allocated CPU (torch would otherwise use every core of the node).
worker_cmd='export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"; '
worker_cmd+="$(printf '%q ' "$python" -m bench.tune)"'tune.storage="$TUNE_STORAGE" '
worker_cmd+="$(printf '%q ' "tune.study_name=$study" "tune.trials_dir=$study_dir/trials")"
worker_cmd+='tune.worker="$SLURM_ARRAY_TASK_ID" '
worker_cmd+="hydra.run.dir=$(printf '%q' "$study_dir")/worker_\${SLURM_ARRAY_TASK_ID} "
if [[ $# -gt 0 ]]; then
    worker_cmd+="$(printf '%q ' "$@")"
fi

# shellcheck disable=SC2086 # SBATCH_ARGS is a list of options
jobid="$(
    sbatch --parsable --array="0-$((workers - 1))" --job-name="tune-$study" \
        --output="$study_dir/worker_%a.log" --open-mode=append --requeue --export=ALL \
        --ntasks=1 --gpus-per-task="${WORKER_GPUS:-1}" --cpus-per-task="${WORKER_CPUS:-4}" \
        --mem="${WORKER_MEM:-16G}" --time="${WORKER_TIME_MIN:-240}" \
        "${site[@]}" ${SBATCH_ARGS:-} --wrap="$worker_cmd"
)"
echo "$jobid" >>"$study_dir/jobids"
cat <<EOF
submitted job array $jobid: $workers workers on study '$study'
logs:    $study_dir/worker_<i>.log    trials: $study_dir/trials/<n>/
summary: $study_dir/worker_0/study_summary.json   (written by worker 0 when the study is done)
watch:   squeue --me --name=tune-$study
live:    optuna trials --study-name $study --storage "\$TUNE_STORAGE"
EOF
