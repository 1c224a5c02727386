"""``python -m ame.merge aggregator=<option> 'experts.paths=[a,b,c]' [experts.init=x] out=<path>``, or
``python -m ame.merge recipe=<mergekit recipe.yml> out=<path>``.

Every bad input is one ``error:`` line (exit 1). Ctrl-C or SIGTERM stop the merge with one line and
nothing written (exit 130 / 143); a full disk or a file-size limit is a bad input like any other
(SIGXFSZ is ignored, so the write fails with EFBIG instead of killing the process)."""
import ctypes
import shlex
import signal
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from ame.errors import AMEError, config_error, hydra_cli, require


class _Terminated(BaseException):
    pass


def _terminate(signum, frame):
    raise _Terminated()


def _reuse_freed_memory() -> None:
    """In this process only: large tensors freed after one chunk are reused by the next. glibc
    serves allocations above 32 MB with fresh mappings and unmaps them on free, so every chunk's
    optimizer state would fault in zeroed pages again (4 KB each: 2 s of 13 over four 0.22B-parameter
    experts with AME-Adam). Nothing else changes; where mallopt is missing, nothing happens."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, which keeps freed ones
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not hand the heap's top back between chunks
    except (OSError, AttributeError):
        pass


@hydra.main(version_base="1.3", config_path="../../conf", config_name="merge")
def main(cfg: DictConfig) -> None:
    import logging

    from hydra.core.hydra_config import HydraConfig

    from ame.merge import merge_pool, merge_recipe

    _reuse_freed_memory()
    signal.signal(signal.SIGTERM, _terminate)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        require(isinstance(cfg.get("quiet"), bool), f"quiet must be true or false, got {cfg.get('quiet')!r}")
        if cfg.quiet:
            logging.getLogger("ame").setLevel(logging.WARNING)
        require(cfg.get("out") is not None and str(cfg.out).strip(),
                "python -m ame.merge needs out=<path> (a folder for folder experts, else a file)")
        seed = cfg.get("seed")
        require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
                f"seed must be an integer ≥ 0, got {seed!r}")
        require(isinstance(cfg.get("overwrite"), bool), f"overwrite must be true or false, got {cfg.get('overwrite')!r}")
        task = list(HydraConfig.get().overrides.task)
        command = "python -m ame.merge " + " ".join(shlex.quote(o) for o in task)
        if cfg.get("recipe"):
            others = [o for o in task if o.split("=")[0].lstrip("+~") in ("aggregator", "experts.paths", "experts.init")]
            if others:
                raise AMEError(f"recipe= names the models and the method; drop {others[0]} (change the method's "
                               "settings with aggregator.<key>=...)")
            merge_recipe(str(cfg.recipe), str(cfg.out), [o for o in task if o.startswith("aggregator.")],
                         seed=seed, overwrite=cfg.overwrite, quiet=cfg.quiet, dtype=cfg.get("dtype"), command=command)
            return
        given = cfg.experts.get("paths")
        require(given is not None and str(given) not in ("", "[]"), "python -m ame.merge needs "
                "'experts.paths=[a,b,c]' (checkpoint files or folders, or a glob), or recipe=<file.yml>")
        paths = OmegaConf.to_container(given) if not isinstance(given, str) else given
        sizes = cfg.experts.get("sizes")
        sizes = OmegaConf.to_container(sizes) if OmegaConf.is_config(sizes) else sizes
        pivot_given = any(o.startswith("aggregator.pivot=") for o in task)
        merge_pool(cfg.aggregator, paths, cfg.experts.get("init"), str(cfg.out), sizes,
                   cfg.experts.get("key_prefix"), cfg.get("dtype"), pivot_given=pivot_given,
                   overwrite=cfg.overwrite, command=command, quiet=cfg.quiet)
    except (AMEError, InterpolationResolutionError) as e:  # the latter: a ${...} that does not resolve
        print(f"error: {e if isinstance(e, AMEError) else config_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        sys.exit(130)
    except _Terminated:
        print("error: terminated; nothing written", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    hydra_cli(main)
