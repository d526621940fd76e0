"""`hypergrad-bench [overrides]` (or `python -m bench`): one run (or a sweep with `-m`) of the Hydra harness.

A thin shell over `bench.train.run`; see bench/conf/config.yaml for the defaults and the README for examples.
Output goes through `logging`, so Hydra's job log (`<run dir>/__main__.log`) holds what the console showed.
"""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from bench.config import ConfigError
from bench.io import mask_secrets
from bench.rundir import discard_if_unused
from bench.train import Interrupted, format_summary, run

# Our bench/conf/hydra/launcher/submitit_slurm.yaml deliberately keeps the plugin's preset name (the documented
# override is `hydra/launcher=submitit_slurm`); Hydra 1.3 warns about that on every sweep, which says nothing to users.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")

log = logging.getLogger(__name__)


# Found through Hydra's package search path, so it works from a checkout and from an installed wheel alike.
@hydra.main(config_path="pkg://bench.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one composed config; return the validation error (for Hydra sweepers that minimize it)."""
    try:
        metrics = run(cfg)
    except ConfigError as e:
        # Bad input is the user's to fix: one line, no traceback, no metrics.json.
        print(f"error: {mask_secrets(str(e))}", file=sys.stderr)
        discard_if_unused()
        sys.exit(2)
    except Interrupted as e:
        # SIGINT/SIGTERM: the checkpoint is saved; 128 + signal number, as a shell reports a killed command.
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted before a checkpoint was saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        # A read-only run directory, a full disk: the file and the reason, then what to do.
        where = f" `{e.filename}`" if e.filename else ""
        print(
            f"error: cannot access{where}: {e.strerror or e}; fix the permissions or pick another directory "
            "(hydra.run.dir=...)",
            file=sys.stderr,
        )
        sys.exit(1)
    from hydra.core.hydra_config import HydraConfig

    log.info("%s", format_summary(metrics, HydraConfig.get().runtime.output_dir))
    return metrics.get("val_error")


if __name__ == "__main__":
    main()
