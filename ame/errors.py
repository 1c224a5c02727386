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

