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
    """A command's ``main`` whose :class:`AMEError` ends it as ``run.py`` does: one ``error:``
    line on stderr, exit code 1."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except AMEError as e:
            sys.exit(f"error: {e}")

    return wrapped
