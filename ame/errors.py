"""User-facing errors: one line that names the problem and the fix."""


class AMEError(Exception):
    """A bad input (config value, data, expert file). ``run.py`` prints it as one line and exits 1."""


def require(ok: bool, message: str) -> None:
    """Raise :class:`AMEError` with ``message`` unless ``ok``."""
    if not ok:
        raise AMEError(message)


def positive_int(value, key: str, minimum: int = 1) -> int:
    """``value`` if it is an integer ≥ ``minimum`` (not a bool), else one clear error naming ``key``."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{key} must be an integer ≥ {minimum}, got {value!r}")
    return value



def one_line(main):
    """A command's ``main`` whose :class:`AMEError`, or a Hydra config it cannot compose (as
    :func:`hydra_cli` reports it), ends it as ``run.py`` does: one ``error:`` line on stderr, exit
    code 1."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            return main(*args, **kwargs)
        except AMEError as e:
            sys.exit(f"error: {e}")
        except (HydraException, OmegaConfBaseException) as e:
            sys.exit(f"error: {config_error(e)}")

    return wrapped


def hydra_cli(main) -> None:
    """Run a ``@hydra.main`` entry point so that a command line Hydra cannot compose (an unknown
    key, a missing option, a malformed override) is one ``error:`` line and exit code 1, like every
    other bad input, instead of Hydra's multi-line report. (Hydra is asked to pass its exceptions
    on, ``HYDRA_FULL_ERROR=1``, whatever the environment said: with ``0`` Hydra would print its
    own report first. Errors inside a run are handled by ``main`` itself, and a bug keeps its whole
    traceback.)"""
    import os
    import sys

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        sys.exit(f"error: {config_error(e)}")


def config_error(e: BaseException) -> str:
    """Hydra's or OmegaConf's report of a command line it could not compose, as one line."""
    import re

    from omegaconf.errors import InterpolationResolutionError

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0].strip()
        if first not in lines:
            lines.insert(1 if lines else 0, first)
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    if any(line.startswith("Available options") for line in lines):  # a missing option: them on one line
        at = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = []
        for line in lines[at + 1:]:
            if line.endswith(":"):  # the next section (Hydra's config search path)
                break
            options.append(line)
        head = re.sub(r"^In '[^']*': ", "", lines[0])
        return f"{head}; {lines[at].rstrip(':').lower()}: {', '.join(options)}"
    text = "; ".join(line.rstrip(".") for line in lines) or type(e).__name__
    if isinstance(e, InterpolationResolutionError):
        text += " (a ${...} in the config or on the command line that does not resolve; fix or remove it)"
    return text
