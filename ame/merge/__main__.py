"""``python -m ame.merge aggregator=<option> 'experts.paths=[a,b,c]' [experts.init=x] out=<path>``."""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ame.errors import AMEError, require
from ame.merge import merge_pool


@hydra.main(version_base="1.3", config_path="../../conf", config_name="merge")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ame.experts import _expand

    try:
        require(cfg.get("out"), "python -m ame.merge needs out=<path> (a folder for folder experts, else a file)")
        given = cfg.experts.get("paths")
        require(given is not None and str(given) not in ("", "[]"), "python -m ame.merge needs "
                "'experts.paths=[a,b,c]' (checkpoint files or folders, or a glob)")
        paths = _expand(OmegaConf.to_container(given) if not isinstance(given, str) else given)
        sizes = cfg.experts.get("sizes")
        pivot_given = any(o.startswith("aggregator.pivot=") for o in HydraConfig.get().overrides.task)
        merge_pool(cfg.aggregator, paths, cfg.experts.get("init"), cfg.out,
                   list(sizes) if sizes is not None else None, cfg.experts.get("key_prefix"), cfg.get("dtype"),
                   pivot_given=pivot_given)
    except AMEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
