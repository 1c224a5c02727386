"""Data-free neural averaging, one run: ``python run.py [group=option ...] [key=value ...]``.

data → shards → experts → aggregate → evaluate → report; see ``ame/pipeline.py`` and README.md.
A bad input ends a single run with one ``error: ...`` line and exit code 1. In a multirun the
failed job is recorded (``error.json`` in its directory), the other jobs go on, and the sweep
ends with exit code 1 naming the failed jobs (``ame.callbacks.SweepFailures``).
"""
import math
import sys
import traceback

import hydra
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError

from ame.errors import AMEError, config_error, hydra_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from ame.callbacks import in_multirun, record_failure
    from ame.pipeline import run

    try:
        try:
            results = run(cfg)
        except InterpolationResolutionError as e:  # a ${...} in the config or the command line that does not resolve
            raise AMEError(config_error(e)) from None
    except AMEError as e:
        if not in_multirun():
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        return record_failure(str(e))
    except Exception as e:  # noqa: BLE001 — a bug: its traceback is kept, and the sweep goes on
        if not in_multirun():
            raise
        return record_failure(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                              f"(an unexpected error; traceback in error.json)", traceback.format_exc())
    value = results["metrics"].get(cfg.optimized_metric)  # the objective for Hydra sweepers
    return float(value) if isinstance(value, (int, float)) else math.nan


if __name__ == "__main__":
    hydra_cli(main)
