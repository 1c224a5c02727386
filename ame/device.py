"""Where tensors live: one reading of the ``device`` settings (``auto``, ``cpu``, ``cuda[:k]``)."""
from __future__ import annotations

import torch

from ame.errors import require


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` → cuda when available, else cpu; a CUDA device without CUDA stops with one line naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(name == "cpu" or (str(name).startswith("cuda") and torch.cuda.is_available()),
            f"{key}={name!r} but CUDA is not available; use cpu or auto")
    return torch.device(name)
