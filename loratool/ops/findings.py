"""What a finding is: every code `inspect` reports with its default severity (docs/inspect.md
documents each), the finding itself, and the facts measured on a module and its base."""

from __future__ import annotations

from dataclasses import dataclass

from ..archs.locate import Location
from ..lazy_torch import torch

# code -> default severity; some checks raise or lower it with the evidence they have.
CODES: dict[str, str] = {
    "nan-inf": "error",
    "fp16-overflow": "warning",
    "underflow": "warning",
    "alpha-missing": "warning",
    "alpha-precision": "warning",
    "scale-unusual": "warning",
    "rank-deficient": "warning",
    "zero-module": "warning",
    "fused-rank-alpha": "error",
    "unknown-key": "warning",
    "orphan-tensor": "error",
    "shape-mismatch": "error",
    "table-mismatch": "error",
    "update-unmeasured": "warning",
    "widened-input": "info",
    "base-mismatch": "error",
    "base-partial": "warning",
    "broken-module": "error",
    "dtype-mixed": "warning",
    "metadata-mismatch": "warning",
    "hash-mismatch": "warning",
    "hash-placeholder": "info",
    "unknown-architecture": "info",
}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    module: str | None
    message: str

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "severity": self.severity, "module": self.module, "message": self.message}


def finding(code: str, module: str | None, message: str, severity: str | None = None) -> Finding:
    return Finding(code, severity or CODES[code], module, message)


@dataclass
class ModuleFacts:
    """Numbers measured on a module's tensors."""

    dw_norm: float | None = None  # ||scale * delta||_F
    numerical_rank: int | None = None
    singular_values: list[float] | None = None  # of scale * delta, largest first (low-rank kinds)
    base_parameters: int | None = None  # size of the base weights it updates, when a base was given


@dataclass
class BasePiece:
    """One located base weight (or row block of one) a module updates."""

    location: Location
    weight: torch.Tensor  # the rows this module touches, as stored
    dtype: str
