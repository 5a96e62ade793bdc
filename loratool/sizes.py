"""Sizes as users type them: 5GB, 500MiB, 2G, 1048576."""

from __future__ import annotations

import re

from .errors import InputError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes in `text`; decimal units as HF's max_shard_size reads them (5GB = 5 * 10^9)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(f"size {text!r}: expected a number with an optional unit (KB, MB, GB, KiB, MiB, GiB)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InputError(f"size {text!r}: must be more than 0 bytes")
    return size
