"""User-facing errors: one line that names the problem and the fix."""


class AMEError(Exception):
    """A bad input (config value, data, expert file). ``run.py`` prints it as one line and exits 1."""


def require(ok: bool, message: str) -> None:
    """Raise :class:`AMEError` with ``message`` unless ``ok``."""
    if not ok:
        raise AMEError(message)
