"""PEFT's per-module config rules (shared by PEFT adapter dirs and diffusers' lora_adapter_metadata)."""

from __future__ import annotations

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
