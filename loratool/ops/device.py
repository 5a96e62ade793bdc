"""Which torch device does the arithmetic: `auto` is CUDA when there is one, else the CPU."""

from __future__ import annotations

from ..errors import InputError
from ..lazy_torch import torch
from ..options import DEVICE_CHOICES


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
        return torch.device(name)
    raise InputError(f"--device {name}: expected one of {', '.join(DEVICE_CHOICES)}")
