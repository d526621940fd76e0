#!/usr/bin/env bash
# Run one of the paper's experiments (its Hydra sweep) and then its report, in one go.
#
#   scripts/reproduce_paper.sh EXPERIMENT [--smoke] [--out DIR] [--jobs N] [-- HYDRA_OVERRIDES...]
#
# EXPERIMENT is a preset of bench/conf/experiment/ (the paper's experiments):
#   mnist_table               Table 1: 18 towers x 3 seeds, 30 epochs, then the 14 re-run rows (each tower's
#                             base optimizer fixed at the values it learned, bench.rerun); dataset=mnist by
#                             default; offline: scripts/reproduce_paper.sh mnist_table -- dataset=mnist5k
#   tower_height_sensitivity  SGD towers of height 0-3 x initial step sizes 1e-8..100 (needs the MNIST files)
#   sensitivity_mnist5k       the same question on the embedded MNIST subset: runs offline on CPU
#   cifar_resnet20            ResNet-20 on CIFAR-10: learned momentum and step size, the fixed baseline on the
#                             same grid, and He et al.'s step decay (needs the CIFAR-10 files and a GPU)
#   char_lstm_war_and_peace   the character LSTM on War and Peace (needs the text; add dataset.download=true)
#   tower_runtime             the cost of each added tower level
# Full size needs the real datasets (paths.data_dir, or HYPERGRAD_DATA_DIR) and, for CIFAR-10, a GPU.
#
# --smoke shrinks every run to a few optimizer steps of one epoch and swaps the datasets for the embedded
# offline ones (mnist5k for MNIST and CIFAR-10, pydoc_text for War and Peace), so the whole pipeline runs
# anywhere in minutes. Its numbers mean nothing; it checks that sweep and report work end to end.
# --out DIR puts the runs under DIR/runs/<preset> and the report under DIR/report (default:
# outputs/reproduce/<experiment>/<date-time>). --jobs N runs N sweep jobs at once (Hydra's joblib launcher).
# Anything after `--` is passed to every sweep as Hydra overrides (e.g. trainer.device=cuda).
set -euo pipefail

# The comment block at the top of this file, without its `# `.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

die() {
    echo "error: $*" >&2
    exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"

experiment=""
smoke=0
out=""
jobs=1
extra=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --smoke) smoke=1 ;;
        --out) [[ $# -ge 2 ]] || die "\`--out\` must be followed by a directory, but got nothing"; out="$2"; shift ;;
        --jobs) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "\`--jobs\` must be a positive integer, but got ${2:-nothing}"
            jobs="$2"; shift ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z "$experiment" ]] || die "\`EXPERIMENT\` must be given once, but got $experiment and $1"; experiment="$1" ;;
    esac
    shift
done
[[ -n "$experiment" ]] || { usage >&2; die "\`EXPERIMENT\` must be given, but got nothing"; }

# The presets one experiment consists of (CIFAR-10 compares three of them in one report).
case "$experiment" in
    cifar_resnet20) presets=(cifar_resnet20 cifar_resnet20_fixed cifar_resnet20_step_decay) ;;
    *) presets=("$experiment") ;;
esac
for preset in "${presets[@]}"; do
    if [[ ! -f "$repo/bench/conf/experiment/$preset.yaml" ]]; then
        known="$(cd "$repo/bench/conf/experiment" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')"
        die "\`EXPERIMENT\` must be one of: ${known}but got $experiment"
    fi
done

out="${out:-$repo/outputs/reproduce/$experiment/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

sweep_args=()
if ((smoke)); then
    # A few steps of one epoch on the embedded datasets; progress bars off to keep the log readable.
    sweep_args+=(trainer.epochs=1 trainer.max_steps=5 trainer.progress=false trainer.checkpoint_every=0)
    case "$experiment" in
        mnist_table | tower_height_sensitivity | tower_runtime) sweep_args+=(dataset=mnist5k) ;;
        # ResNet-20 on a CPU: small batches keep the 19 smoke runs to a few minutes.
        cifar_resnet20) sweep_args+=(dataset=mnist5k trainer.batch_size=16 trainer.eval_batch_size=500) ;;
        char_lstm_war_and_peace) sweep_args+=(dataset=pydoc_text) ;;
    esac
fi
if ((jobs > 1)); then
    sweep_args+=(hydra/launcher=joblib "hydra.launcher.n_jobs=$jobs")
fi

cd "$repo"
# Each stage's wall time goes to the log and to $out/stage_times.tsv (the report's compute is not wall time).
stage_start=$(date +%s)
stage_done() {
    local now
    now=$(date +%s)
    echo "== stage $1 took $((now - stage_start)) s"
    printf '%s\t%s\n' "$1" "$((now - stage_start))" >>"$out/stage_times.tsv"
    stage_start=$now
}
inputs=()
for preset in "${presets[@]}"; do
    runs="$out/runs/$preset"
    echo "== sweep: experiment=$preset -> $runs"
    "$python" -m bench -m "experiment=$preset" "hydra.sweep.dir=$runs" "${sweep_args[@]}" "${extra[@]}"
    inputs+=("input=$runs")
    stage_done "sweep $preset"
done

# Table 1's re-run rows: every finished tower's base optimizer, fixed at the values it learned.
if [[ "$experiment" == mnist_table ]]; then
    echo "== re-runs with the learned values -> $out/runs/${experiment}_reruns"
    "$python" -m bench.rerun "$out/runs/$experiment" --out "$out/runs/${experiment}_reruns"
    inputs+=("input=$out/runs/${experiment}_reruns")
    stage_done "re-runs"
fi

echo "== report -> $out/report"
# With one preset the report finds it in the runs' Hydra overrides and adds the paper's published numbers.
"$python" -m bench.report "${inputs[@]}" "output_dir=$out/report" "hydra.run.dir=$out/report/.hydra_run"
stage_done report
echo "done: $out/report/report.md"
