"""`hydra/launcher=population` (bench/conf/hydra/launcher/population.yaml): the shell Hydra instantiates.

The work is in `bench.launcher`; Hydra only accepts launcher classes defined under `hydra_plugins`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class PopulationLauncher(Launcher):
    """Trains the stackable jobs of a sweep as populations; every job lands as the basic launcher lands it."""

    def __init__(self, max_members: int | None = None, **kwargs: Any) -> None:
        if max_members is not None and (not isinstance(max_members, int) or isinstance(max_members, bool)
                                        or max_members < 1):  # fmt: skip
            raise ValueError(f"`hydra.launcher.max_members` must be an integer >= 1 or null, but got {max_members!r}")
        self.max_members = max_members
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from bench.sweepconfig import use

        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context
        use(hydra_context.config_loader)  # the sweeper's check of the batch and the launcher share compositions

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bench.launcher import launch_population

        return launch_population(self, job_overrides, initial_job_idx)


def _slurm_base() -> type:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    return SlurmLauncher


class PopulationSlurmLauncher(_slurm_base()):  # type: ignore[misc]
    """`hydra/launcher=population_slurm`: each population (and each job that runs alone) is one task of a submitit
    job array; a preempted population resumes from its checkpoint when SLURM requeues it."""

    def __init__(self, max_members: int | None = None, **params: Any) -> None:
        PopulationLauncher.__init__(self, max_members)  # checks max_members
        super().__init__(**params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from bench.sweepconfig import use

        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        use(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bench.launcher import launch_population_array

        return launch_population_array(self, job_overrides, initial_job_idx)

    def __call__(self, unit: list[tuple[list[str], int]], singleton_state: dict[Any, Any]) -> list[JobReturn]:
        from bench.launcher import run_unit

        return run_unit(self, unit, singleton_state)
