"""PEFT's per-module config rules (shared by PEFT adapter dirs and diffusers' lora_adapter_metadata)."""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import FormatError


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key, in dict order, that matches a suffix of the module path wins.

    A key is a regex matched as `(.*\\.)?(key)$`, so `q_proj` matches every q_proj and a leading `^`
    anchors the key to the full path.
    """
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise FormatError(f"invalid rank/alpha pattern {key!r} in the adapter config ({exc})") from None
    return default


def _rank_or_mask(value: Any) -> bool:
    """A rank, or AdaLoRA's mask of the ranks its allocation kept."""
    if isinstance(value, list):
        return all(isinstance(x, bool) for x in value)
    return isinstance(value, int) and not isinstance(value, bool)


# Fields whose type the readers rely on: name -> (accepts, what it must be).
_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number")
_FIELDS: dict[str, tuple[Any, str]] = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "lora_alpha": _NUMBER,
    "alpha": _NUMBER,
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(_rank_or_mask(x) for x in v.values()),
        "an object of integer ranks (or AdaLoRA's lists of kept ranks)",
    ),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(_NUMBER[0](x) for x in v.values()), "an object of numbers"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "target_modules": (
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "a string or a list of strings",
    ),
    "modules_to_save": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
}


def checked_config(config: dict, where: object) -> dict:
    """The config, once every field the readers use has the type PEFT gives it (null = unset)."""
    for name, (accepts, want) in _FIELDS.items():
        value = config.get(name)
        if value is not None and not accepts(value):
            raise FormatError(f"{where}: {name} must be {want}, got {value!r}")
    masks = [k for k, v in (config.get("rank_pattern") or {}).items() if isinstance(v, list)]
    if masks and config.get("peft_type") != "ADALORA":
        raise FormatError(f"{where}: rank_pattern[{masks[0]!r}] is a list; only AdaLoRA keeps masks there")
    return config
