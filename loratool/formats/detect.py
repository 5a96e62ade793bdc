"""Which layout a file is in: every codec scores the share of the file's keys it explains.

The winner reads the file; the runner-up and the keys nobody explains are kept for the report, so
a user can see why a file was read the way it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..adapter import Adapter
from ..errors import FormatError
from ..io.source import TensorSource, open_source
from .base import Claim, Codec
from .diffsynth import DiffSynthCodec
from .diffusers import DiffusersCodec
from .kohya import KohyaCodec
from .legacy import LegacyCodec
from .lora_diffusion import LoraDiffusionCodec
from .mlx import MlxCodec
from .native import NativeCodec
from .peft import PeftCodec
from .xlabs import XLabsCodec

# Order breaks ties: the more specific layout first.
CODECS: tuple[Codec, ...] = (
    MlxCodec(),
    PeftCodec(),
    KohyaCodec(),
    DiffusersCodec(),
    LegacyCodec(),
    LoraDiffusionCodec(),
    XLabsCodec(),
    NativeCodec(),
    DiffSynthCodec(),
)


@dataclass
class Detection:
    claim: Claim
    total: int
    ranking: list[tuple[str, int]]  # (format, keys explained), best first
    unexplained: list[str] = field(default_factory=list)

    @property
    def codec(self) -> Codec:
        return self.claim.codec

    @property
    def share(self) -> float:
        return self.claim.count / self.total if self.total else 0.0

    @property
    def runner_up(self) -> tuple[str, int] | None:
        return self.ranking[1] if len(self.ranking) > 1 and self.ranking[1][1] > 0 else None


def detect_format(source: TensorSource) -> Detection:
    claims = [codec.claim(source) for codec in CODECS]
    ranked = sorted(claims, key=lambda c: -c.count)  # stable: ties keep CODECS order
    best = ranked[0]
    total = len(source)
    if total == 0:
        raise FormatError(f"{source.path}: the file holds no tensors")
    if best.count == 0:
        sample = ", ".join(repr(k) for k in source.keys()[:3])
        raise FormatError(
            f"{source.path}: not a LoRA file we know: no layout explains any of its {total} tensors (e.g. {sample})"
        )
    explained = set(best.keys) | set(best.extra)
    return Detection(
        claim=best,
        total=total,
        ranking=[(c.codec.name, c.count) for c in ranked],
        unexplained=[k for k in source if k not in explained],
    )


def read_adapter(
    path: str | os.PathLike, arch: str | None = None, allow_pickle: bool = False
) -> tuple[Adapter, Detection]:
    """Open, detect and read a LoRA file or PEFT adapter directory (on `arch` when given); pickle
    files only with `allow_pickle`, and then only their tensors."""
    source = open_source(path, allow_pickle)
    try:
        detection = detect_format(source)
        adapter = detection.codec.read(source, detection.claim, arch)
    except BaseException:
        source.close()
        raise
    return adapter, detection
