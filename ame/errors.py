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


def instantiate(node, what: str, **kwargs):
    """``hydra.utils.instantiate`` whose failures read as one line: an :class:`AMEError` raised by
    the constructor passes through (Hydra wraps it), anything else is prefixed with ``what``."""
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except AMEError:
        raise
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, AMEError):
            raise cause from None
        message = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        first = " ".join(message[:2]) if message and message[0].endswith(":") else (message or [type(cause).__name__])[0]
        raise AMEError(f"{what}: {first}") from None
