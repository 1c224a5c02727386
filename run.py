"""Data-free neural averaging, one run: ``python run.py [group=option ...] [key=value ...]``.

data → shards → experts → aggregate → evaluate → report; see ``ame/pipeline.py`` and README.md.
"""
import sys

import hydra
from omegaconf import DictConfig

from ame.errors import AMEError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from ame.pipeline import run

    try:
        results = run(cfg)
    except AMEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    metric = cfg.get("optimized_metric", "id/acc")  # the objective for Hydra sweepers (e.g. Optuna)
    if metric not in results["metrics"]:
        print(f"error: optimized_metric={metric} is not among this run's metrics "
              f"({', '.join(sorted(results['metrics']))}); choose one of them", file=sys.stderr)
        sys.exit(1)
    return results["metrics"][metric]


if __name__ == "__main__":
    main()
