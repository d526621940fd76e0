#!/usr/bin/env bash
# Submit a Hydra sweep of `python -m bench` to SLURM as one job array (hydra/launcher=submitit_slurm).
#
#   scripts/slurm/submit_sweep.sh [--driver nohup|sbatch|foreground] NAME [hydra overrides...]
#   scripts/slurm/submit_sweep.sh lr-height optimizer.lr=1e-4,1e-3 optimizer.height=0,1,2,3
#
# Runs land in $SWEEP_ROOT/NAME/<job number>/ (metrics.json, history.csv, checkpoint.pt, .hydra/); SLURM logs in
# $SWEEP_ROOT/NAME/.submitit/<job id>/. The sweep directory has a fixed name (not a timestamp) so that running the
# same command again continues the sweep: finished runs are skipped (their metrics.json is the proof) and
# interrupted ones resume from their checkpoint.
#
# Hydra's driver process submits the array and waits for it. --driver picks where it waits:
#   nohup       (default) in the background on this (login) node; its log is $SWEEP_ROOT/NAME/driver.log
#   sbatch      as a small 1-CPU SLURM job of its own, for sites that stop long processes on login nodes
#   foreground  in this terminal, until the sweep ends (exit code: the sweep's)
# Environment: PYTHON (default: the repository's .venv/bin/python), SWEEP_ROOT (default: outputs/multirun),
# DRIVER_TIME_MIN (sbatch driver's time limit, default 4320 = 3 days), DRIVER_SBATCH_ARGS (e.g. "--partition=cpu").
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
driver=nohup
if [[ "${1:-}" == "--driver" ]]; then
    driver="${2:-}"
    shift 2 || true
fi
case "$driver" in
    nohup | sbatch | foreground) ;;
    *)
        echo "--driver must be nohup, sbatch or foreground, but got '$driver'" >&2
        exit 2
        ;;
esac
if [[ $# -lt 1 || "$1" == -* || "$1" == *=* ]]; then
    echo "usage: $0 [--driver nohup|sbatch|foreground] NAME [hydra overrides...]" >&2
    exit 2
fi
name="$1"
shift
if [[ ! "$name" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "NAME must be letters, digits, '.', '_' or '-', but got '$name'" >&2
    exit 2
fi

python="${PYTHON:-$repo/.venv/bin/python}"
sweep_dir="$(realpath -m "${SWEEP_ROOT:-outputs/multirun}/$name")"
mkdir -p "$sweep_dir"
cmd=("$python" -m bench --multirun hydra/launcher=submitit_slurm "hydra.sweep.dir=$sweep_dir" "hydra.launcher.name=$name" "$@")

case "$driver" in
    foreground)
        exec "${cmd[@]}"
        ;;
    nohup)
        nohup "${cmd[@]}" >>"$sweep_dir/driver.log" 2>&1 </dev/null &
        echo "$!" >"$sweep_dir/driver.pid"
        echo "driver pid $! (log: $sweep_dir/driver.log)"
        ;;
    sbatch)
        # The driver's own SLURM_* variables would leak into the jobs it submits (sbatch exports the environment);
        # SLURM_CONF names the cluster and stays.
        clean='for v in $(compgen -v SLURM_); do [[ $v == SLURM_CONF ]] || unset "$v"; done; '
        # shellcheck disable=SC2086 # DRIVER_SBATCH_ARGS is a list of options
        sbatch --parsable --job-name="$name-driver" --cpus-per-task=1 --mem=2G \
            --time="${DRIVER_TIME_MIN:-4320}" --output="$sweep_dir/driver.log" --open-mode=append \
            ${DRIVER_SBATCH_ARGS:-} --wrap="$clean$(printf '%q ' "${cmd[@]}")" >"$sweep_dir/driver.jobid"
        echo "driver job $(cat "$sweep_dir/driver.jobid") (log: $sweep_dir/driver.log)"
        ;;
esac
cat <<EOF
results: $sweep_dir/<job number>/metrics.json
watch:   squeue --me --name=$name,$name-driver     tail -f $sweep_dir/driver.log
report:  $python -m bench.report input=$sweep_dir   (once the sweep is done)
EOF
