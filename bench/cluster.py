"""Runs on a SLURM cluster: Hydra's submitit launcher, made safe for preemption and time limits.

`hydra/launcher=submitit_slurm` (bench/conf/hydra/launcher/submitit_slurm.yaml) is Hydra's own submitit launcher plus
the `CheckpointOnPreemption` job callback below, which changes how a job reacts to SLURM's warning signals.

submitit's handler requeues the job the moment its signal (USR2, sent `signal_delay_s` before the time limit)
arrives, wherever training happens to be, so everything since the last periodic checkpoint would be lost. With the
callback the signal only asks the training loop for a checkpoint (`bench.train.request_checkpoint`); the loop saves
it after the current step and `bench.train.run` returns without writing metrics.json. Only then is submitit's
handler called: it pickles the same job again and runs `scontrol requeue`. The requeued job calls
`bench.train.run` on the same run directory, which resumes from that checkpoint and ends with the same metrics as
an uninterrupted run. SIGTERM (SLURM's notice before a preemption or `scontrol requeue` kills the job) gets the same
checkpoint-then-stop treatment; the job then exits without a result, and SLURM requeues it or not, as its
preemption mode says. A run that has already finished is never trained again: `bench.train.run` returns the
metrics its `metrics.json` holds.

`python -m bench.cluster sbatch-options bench/conf/local/slurm.yaml` prints the site settings of that file as sbatch
options, one a line, for scripts that call sbatch themselves (scripts/slurm/submit_tune_workers.sh).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["SITE_KEYS", "CheckpointOnPreemption", "sbatch_options"]

SITE_KEYS = ("partition", "account", "qos", "constraint", "exclude", "gres", "comment")
"""Keys of bench/conf/local/slurm.yaml that `sbatch_options` passes on, with `additional_parameters`; resources (time,
CPUs, memory, GPUs) are each script's own choice."""


class CheckpointOnPreemption(Callback):
    """Hydra job callback: in a submitit SLURM job, checkpoint first and requeue after (outside SLURM: nothing)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # submitit installed its handlers before calling the launcher, which runs this job and its callbacks.
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return
        self.signum = None
        for signum in (_requeue_signal(), signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        from bench.train import request_checkpoint

        # USR2 (checkpoint and requeue) wins over SIGTERM (checkpoint and stop) when both arrive.
        if self.signum != _requeue_signal():
            self.signum = signum
        print(f"bench.cluster: got {signal.Signals(signum).name}, saving a checkpoint after this step", flush=True)
        request_checkpoint()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not self._previous:
            return
        previous, self._previous = self._previous, {}
        stopped = self.signum is not None and _stopped_for_checkpoint(job_return)
        for signum, handler in previous.items():
            # Once stopped, a repeated warning signal must not start a second requeue.
            signal.signal(signum, signal.SIG_IGN if stopped else handler)
        if not stopped:
            return  # no signal, or the run finished (or crashed) before it reached a step boundary
        if self.signum == _requeue_signal():
            print("bench.cluster: checkpoint saved; submitit requeues the job", flush=True)
            # submitit's own handler pickles the launcher's checkpoint() (the same job again), runs
            # `scontrol requeue` and exits the process.
            previous[self.signum](self.signum, None)
        # SIGTERM: SLURM requeues a preempted job itself (PreemptMode=REQUEUE) or is ending it. Exiting without
        # a result keeps Hydra's driver waiting for the requeued job instead of recording a failure.
        print("bench.cluster: checkpoint saved; exiting for SLURM to requeue or end the job", flush=True)
        sys.exit(-1)


def _requeue_signal() -> signal.Signals:
    from submitit.slurm.slurm import SlurmJobEnvironment

    return SlurmJobEnvironment._usr_sig()


def _stopped_for_checkpoint(ret: JobReturn) -> bool:
    """Whether the job's run saved a checkpoint and stopped (rather than finished, crashed, or ignored the signal).

    Asked of `bench.train` itself: a job that writes no metrics.json of its own (a tuning worker, a population)
    is not thereby taken for a stopped one. A crash is not requeued: it would crash again.
    """
    from bench.train import stopped_for_checkpoint

    return ret.status == JobStatus.COMPLETED and stopped_for_checkpoint()


def sbatch_options(site_file: str | Path) -> list[str]:
    """The site settings of a bench/conf/local/slurm.yaml as sbatch options (none when the file does not exist)."""
    from omegaconf import OmegaConf

    path = Path(site_file)
    if not path.is_file():
        return []
    site = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(site, dict):
        raise ValueError(f"`{path}` must hold a mapping of launcher keys, but got {site!r}")
    options = [f"--{key}={site[key]}" for key in SITE_KEYS if site.get(key) is not None]
    extra = site.get("additional_parameters") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"`additional_parameters` in {path} must be a mapping, but got {extra!r}")
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        options.append(flag if value is True else f"{flag}={value}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.cluster sbatch-options FILE`: print FILE's site settings as sbatch options."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "sbatch-options":
        print("usage: python -m bench.cluster sbatch-options bench/conf/local/slurm.yaml", file=sys.stderr)
        return 2
    try:
        options = sbatch_options(args[1])
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    for option in options:
        print(option)
    return 0


if __name__ == "__main__":
    sys.exit(main())
