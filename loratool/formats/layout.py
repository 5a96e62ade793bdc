"""What every layout's writer shares: the `Layout` interface (what a layout names, what it cannot
hold, its tensors and metadata), the output `Entry`, the metadata keys layouts own, and how alphas
and the source's metadata are carried over.

Each layout's reader (its codec) and writer live together in one module: `kohya.py`, `diffusers.py`,
`peft.py` (with `peft_keyed.py` for what the last two share); `LAYOUTS` in `__init__.py` lists the
writers.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..adapter import AdapterModule, Piece
from ..archs import BaseArchitecture, Targets
from ..io.safetensors_file import DTYPES, rounded
from ..io.source import PEFT_WEIGHTS
from ..kinds import Kind
from ..lazy_torch import torch
from .kohya_record import network_dim_alpha

# Header keys layouts write for themselves; a conversion never carries another layout's over.
DIFFUSERS_CONFIG_KEY = "lora_adapter_metadata"  # diffusers: a LoraConfig dict per component
HF_MODULES_KEY = "loratool.hf_modules"  # kohya file of an LLM: module name -> path and type
PEFT_CONFIG_KEY = "loratool.peft_config"  # kohya file of an LLM: the PEFT config to restore
COMPONENT_KEY = "loratool.component"  # PEFT dir of a diffusion model: the pipeline component it adapts
WRAPPER = "base_model.model."  # PEFT's prefix before a single model's module paths
OWNED_METADATA = (DIFFUSERS_CONFIG_KEY, HF_MODULES_KEY, PEFT_CONFIG_KEY, COMPONENT_KEY)
# lora_diffusion's record of its wrapped classes and numbered ranks: true only of its own numbering.
LORA_DIFFUSION_KEYS = re.compile(r"^(unet|text_encoder)(:\d+:rank)?$")

EMBEDDING_NAMES = {"down": "lora_embedding_A", "up": "lora_embedding_B"}
# The PEFT config fields convert owns: recomputed from the modules, whatever the source config said.
MATH_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias")


class Origin(Protocol):
    """What a layout carries over from where the units came from: an Adapter, or the facts
    extract records about the checkpoints it read."""

    format: str  # the source layout ("peft", "kohya", ...), or "extracted"
    metadata: dict[str, str]
    config: dict | None  # PEFT adapter_config.json fields to keep


@dataclass(frozen=True)
class Entry:
    """One output tensor: its key and where its bytes come from."""

    key: str
    piece: Piece


class Layout(ABC):
    name: str
    scheme: str  # tensor naming scheme of the kinds: kohya | peft
    single_component = False
    is_directory = False  # written as a directory (weights and the file `config` returns), not as one file
    weights_name = PEFT_WEIGHTS  # a directory layout's weights file

    @abstractmethod
    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        """The module name this layout gives `targets`, or None when it has no name for them."""

    def native_rows(self, arch: BaseArchitecture, targets: Targets) -> bool:
        """Whether this layout's name for `targets` means single-file row order."""
        return False

    @abstractmethod
    def why_not(self, unit: AdapterModule) -> str | None:
        """Why this layout cannot hold `unit` (None when it can)."""

    @abstractmethod
    def entries(self, name: str, unit: AdapterModule, arch: BaseArchitecture | None) -> list[Entry]:
        """The unit's tensors under their keys in this layout."""

    def metadata(
        self, units: dict[str, AdapterModule], adapter: Origin, arch: BaseArchitecture | None
    ) -> dict[str, str]:
        return carried_metadata(adapter.metadata, units)

    def token_key(self, token: str) -> str | None:
        """Where this layout keeps a textual-inversion token's embedding (None: it has no place)."""
        return None

    def carries_full_weights(self, arch: BaseArchitecture | None) -> bool:
        """Whether PEFT's saved full weights (modules_to_save, embedding layers) keep their keys here."""
        return False

    def adopt(self, unit: AdapterModule, load: Callable[[Piece], torch.Tensor]) -> AdapterModule:
        """The unit as a kind this layout has names for, where another library's kind holds the
        same update (IA3: PEFT's l is LyCORIS's 1 + w); planned before anything is split or named."""
        return unit

    def prepare(self, unit: AdapterModule, load: Callable[[Piece], torch.Tensor]) -> AdapterModule:
        """The unit as this layout stores it, when its rules need the numbers moved (same update)."""
        return unit

    def check_together(self, units: dict[str, AdapterModule], arch: BaseArchitecture | None) -> None:
        """Refuse (ConversionError naming a module) what the units cannot be as one output."""
        return None


def carried_metadata(metadata: dict[str, str], units: dict[str, AdapterModule]) -> dict[str, str]:
    """The source's own metadata (training record, modelspec), without keys a layout owns, and
    kohya's network dim/alpha fields, when present, recomputed from the modules as written."""
    kept = {k: v for k, v in metadata.items() if k not in OWNED_METADATA and not LORA_DIFFUSION_KEYS.match(k)}
    return network_dim_alpha(kept, units)


def factor_pieces(kind: Kind, pieces: dict[str, Piece], scheme: str, embedding_names: bool) -> dict[str, Piece]:
    names = {role: suffix for suffix, role in kind.names[scheme].items() if not suffix.startswith("lora_embedding")}
    names.update({alias: names[role] for alias, role in kind.aliases.items() if role in names})
    if embedding_names:
        names.update(EMBEDDING_NAMES)
    return {names[role]: piece for role, piece in pieces.items() if role in names}


def reshaped(piece: Piece, shape: tuple[int, ...]) -> Piece:
    assert not piece.transposed, "a transposed piece is reshaped where it is made"
    if piece.key is not None:
        return Piece(piece.dtype, shape, piece.key)
    return Piece(piece.dtype, shape, None, lambda: piece.compute().reshape(shape))


def exact_in(value: float, dtype: str) -> bool:
    return rounded(value, dtype) == value


def alpha_piece(unit: AdapterModule, alpha: float) -> Piece:
    """The alpha tensor: the source's own bytes when unchanged, else in the factors' dtype when
    that holds the value exactly, else in F32 (a bf16 0.1 would read back as 0.10009765625)."""
    if unit.alpha_key is not None and not unit.rslora and unit.alpha == alpha:
        return Piece(unit.alpha_dtype or "F32", (), unit.alpha_key)
    factor_dtype = next(iter(unit.pieces.values())).dtype
    dtype = factor_dtype if exact_in(alpha, factor_dtype) else "F32"
    return Piece(dtype, (), None, lambda: torch.tensor(alpha, dtype=DTYPES[dtype]))
