"""The canonical in-memory adapter: what every codec reads into and writes from.

Modules are keyed by the name the file uses and point at canonical targets of the architecture.
Tensors stay on disk until asked for (`Adapter.tensors`), so an adapter of any size costs only its
header to hold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import NamedTuple

from .archs import BaseArchitecture, Targets
from .archs.base_keys import base_architecture, base_key_index
from .archs.fit import shape_text
from .errors import InputError, LoratoolError
from .io.safetensors_file import FLOAT_DTYPES
from .io.source import TensorSource
from .kinds import Kind, dora
from .lazy_torch import torch


class Piece(NamedTuple):
    """One tensor of a module: a source tensor, copied byte for byte when written (its shape may
    differ from the stored one by size-1 dims), or a computation deferred until it is written, so
    planning holds no tensor data. (A tuple: a library scan builds one per tensor of every file.)"""

    dtype: str
    shape: tuple[int, ...]
    key: str | None = None
    compute: Callable[[], torch.Tensor] | None = None
    transposed: bool = False  # the transpose of the 2-D tensor `key` or `compute` gives (mlx's factors)

    @classmethod
    def made(cls, like: Piece, shape: tuple[int, ...], compute: Callable[[], torch.Tensor], dtype: str = "") -> Piece:
        return cls(dtype or like.dtype, tuple(shape), None, compute)


class _HeaderFacts:
    """What a module's factor shapes and dtypes say about it (see AdapterModule._facts): the same
    for every module of the same kind, shapes and dtypes, so shared between them."""

    def __init__(self, kind: Kind, signature: tuple[tuple[str, tuple[int, ...], str], ...]) -> None:
        shapes = {role: shape for role, shape, _ in signature}
        dtypes = {role: dtype for role, _, dtype in signature}
        self.kind = kind
        self.shapes = MappingProxyType(shapes)
        self.dtypes = MappingProxyType(dtypes)
        self.shape_problem = kind.check(shapes)
        self.factor_problem = self.shape_problem or _factor_problem(kind, shapes, dtypes)
        self.rank = kind.rank(shapes)
        self.parameters = kind.parameters(shapes)
        self._weight_shape: tuple[int, ...] | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Asked only of factors that fit together, so computed only then."""
        if self._weight_shape is None:
            self._weight_shape = self.kind.weight_shape(self.shapes)
        return self._weight_shape


@lru_cache(maxsize=1 << 14)
def _facts_of(kind: Kind, signature: tuple[tuple[str, tuple[int, ...], str], ...]) -> _HeaderFacts:
    """The facts of a kind, shapes and dtypes, remembered: a library's files repeat a few."""
    return _HeaderFacts(kind, signature)


def _factor_problem(kind: Kind, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> str | None:
    """A factor that is not floating point, or is empty."""
    for role, dtype in dtypes.items():
        if role in kind.flag_roles:
            continue
        if dtype not in FLOAT_DTYPES:
            return f"{role} is stored as {dtype}; adapter factors must be floating point"
        if 0 in shapes[role]:
            return f"{role} is empty (shape {list(shapes[role])})"
    return None


@dataclass
class AdapterModule:
    """One module of an adapter, as read from a file or as planned for one (a split part, a fused
    group, an extracted factorization): the same record, so every command and writer speaks of a
    module the same way."""

    name: str  # as written in the file (kohya name, dotted path, ...); for a planned module, its source(s)
    kind: Kind
    pieces: dict[str, Piece]  # role -> tensor: the kind's roles, "bias" (lora_B.bias) and "dora" (the magnitude)
    # canonical modules, in row order for a fused weight; empty when the architecture does not know the name
    targets: Targets = ()
    component: str | None = None
    alpha: float | None = None  # None: not recorded anywhere (alpha = rank then)
    alpha_key: str | None = None  # the tensor holding alpha, while it is still this module's alpha
    alpha_dtype: str | None = None
    alpha_source: str = "default"  # tensor | config | metadata | default
    rslora: bool = False
    declared_rank: int | None = None  # rank from a config, for kinds whose tensors do not show one
    transposed: bool = False  # the base weight is stored (in, out) relative to the update (fan_in_fan_out, embeddings)
    embedding: bool = False  # adapts an embedding table (PEFT lora_embedding_A/B)
    native_rows: bool = False  # named after the single-file module, so its rows follow that layout's order
    dora_columns: bool = False  # the DoRA magnitude is per input column (LyCORIS wd_on_out off)
    bias_unscaled: bool = False  # its "bias" is a kohya `diff_b` beside LoRA factors: applied at strength alone
    notes: list[str] = field(default_factory=list)  # what planning did to it, for the report
    # The table's full-size shape for its targets, when the factors have other widths (a real-width
    # file only; see archs/fit.py): the module is not what its name says in that architecture.
    table_shape: tuple[int, ...] | None = None

    @property
    def keys(self) -> dict[str, str]:
        """role -> source tensor key, for the roles other than DoRA's magnitude."""
        return {r: p.key for r, p in self.pieces.items() if r != dora.ROLE and p.key is not None}

    def _facts(self) -> _HeaderFacts:
        """What the pieces' headers say about the module, computed once per `pieces` and `kind`:
        every report, check and plan asks for it many times per module. Assign a new `pieces` (do
        not edit it in place) to change it."""
        known = self.__dict__.get("_header_facts")
        if known is None or known[0] is not self.pieces or known[1] is not self.kind:
            signature = tuple((r, p.shape, p.dtype) for r, p in self.pieces.items() if r != dora.ROLE)
            known = (self.pieces, self.kind, _facts_of(self.kind, signature))
            self.__dict__["_header_facts"] = known
        return known[2]

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self._facts().shapes

    @property
    def dtypes(self) -> Mapping[str, str]:
        return self._facts().dtypes

    @property
    def dora_key(self) -> str | None:
        piece = self.pieces.get(dora.ROLE)
        return None if piece is None else piece.key

    @property
    def dora_shape(self) -> tuple[int, ...]:
        piece = self.pieces.get(dora.ROLE)
        return () if piece is None else piece.shape

    @property
    def shape_problem(self) -> str | None:
        """Why the factor shapes cannot belong together (None when they can)."""
        return self._facts().shape_problem

    @property
    def problem(self) -> str | None:
        """Why the module cannot be what it claims (None when it can), from the header and config
        alone: factors that do not fit together, empty or non-float factors, a config rank the
        factors do not have (PEFT refuses to load those), a non-finite alpha. Nothing numeric is
        computed for a module with a problem, and no command writes one."""
        facts = self._facts()
        if facts.factor_problem:
            return facts.factor_problem
        shown = facts.rank
        declared = self.declared_rank if self.kind.declares_factor_rank else None
        if declared is not None and shown is not None and shown != declared:
            return f"the adapter config gives r={self.declared_rank} but the factors have rank {shown}"
        if self.alpha is not None and not math.isfinite(self.alpha):
            return f"alpha is {self.alpha}"
        return None

    @property
    def rank(self) -> int | None:
        return self._facts().rank or self.declared_rank

    @property
    def effective_alpha(self) -> float | None:
        """The alpha the math uses: the stored one, or the rank when none is stored."""
        if self.alpha is not None:
            return self.alpha
        return None if self.rank is None or not self.kind.has_alpha else float(self.rank)

    @property
    def scale(self) -> float:
        return self.kind.scale(self.alpha, self.shapes, self.rslora, self.declared_rank)

    def alpha_for(self, rslora: bool) -> float | None:
        """The alpha that gives this module's scale under a layout's rule (alpha/r or alpha/sqrt(r))."""
        if rslora == self.rslora and self.alpha is not None:
            return self.alpha
        rank = self.rank
        if rank is None:
            return None
        return self.scale * (math.sqrt(rank) if rslora else rank)

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(up, down) shapes of a plain LoRA/LoCon of this module's update at `rank`: up keeps its
        1x1-conv form, and a kernel (a Tucker core's too) moves into down."""
        weight = self.kind.weight_shape(self.shapes)
        up = self.pieces["up"].shape
        return (up[0], rank, *up[2:]), (rank, *weight[1:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this module updates, oriented as the base model stores it."""
        shape = self._facts().weight_shape
        return (shape[1], shape[0], *shape[2:]) if self.transposed else shape

    @property
    def parameters(self) -> int:
        return self._facts().parameters

    @property
    def kind_label(self) -> str:
        return self.kind.name + ("+dora" if dora.ROLE in self.pieces else "")


@dataclass
class Orphan:
    """A tensor that belongs to no complete module."""

    key: str
    module: str
    reason: str
    severity: str = "error"


TOKEN_WHAT = "textual-inversion token embedding"  # how reports name what `Adapter.tokens` holds


@dataclass
class Adapter:
    source: TensorSource
    format: str
    variant: str  # which dialect of the format: prefixes used, producing tool, ...
    arch: BaseArchitecture | None
    arch_reason: str
    modules: dict[str, AdapterModule]
    metadata: dict[str, str]
    config: dict | None = None  # PEFT adapter_config.json or diffusers lora_adapter_metadata
    alpha_convention: str = (
        "tensor"  # where this layout keeps alpha: tensor | config | none | scale (the scale itself, mlx)
    )
    orphans: list[Orphan] = field(default_factory=list)
    extra_keys: dict[str, str] = field(default_factory=dict)  # explained but not adapter tensors: key -> what it is
    tokens: dict[str, str] = field(default_factory=dict)  # textual-inversion embeddings: key -> token
    arch_tied: list[str] = field(default_factory=list)  # architectures the module names fit equally well
    # The layout that writes this file's own form: what combine and resize write when not told.
    native_layout: str = "kohya"

    def place_on_base(self, base_keys: Iterable[str], error: type[LoratoolError]) -> None:
        """No table knows the modules: find each name among a base checkpoint's own keys
        (archs/base_keys.py), refusing a name two base weights spell alike. Names it does not
        find stay unplaced, as with a table."""
        index = base_key_index(base_keys)
        resolved = {}
        for name in self.modules:
            paths = index.get(name, set())
            if len(paths) > 1:
                first, second = sorted(paths)[:2]
                raise error(f"{name}: the base's {first}.weight and {second}.weight both spell this name; cannot tell")
            if paths:
                resolved[name] = next(iter(paths))
        if not resolved:
            return
        for name, path in resolved.items():
            self.modules[name].targets = (path,)
        self.arch = base_architecture()
        self.arch_reason = f"{len(resolved)} of {len(self.modules)} module names found among the base's keys"

    def load(self, key: str) -> torch.Tensor:
        """A tensor of the adapter, refused when it holds NaN or inf: every command that writes
        would only spread the damage (inspect reads the raw bytes and reports it instead)."""
        tensor = self.source.load(key)
        refuse_non_finite(tensor, self.source.path, key)
        return tensor

    def tensors(self, module: AdapterModule) -> dict[str, torch.Tensor]:
        return {role: self.load(key) for role, key in module.keys.items()}

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    wide = tensor if tensor.element_size() > 1 else tensor.float()  # no isfinite for fp8 on every build
    return bool(torch.isfinite(wide).all())


def refuse_non_finite(tensor: torch.Tensor, path: object, key: str) -> None:
    if not all_finite(tensor):
        raise non_finite(path, key)


def non_finite(path: object, key: str) -> InputError:
    return InputError(f"{path}: tensor {key!r} holds NaN or inf values; the file is damaged (inspect it)")


def refuse_unusable(
    adapter: Adapter, unexplained: list[str], error: type[LoratoolError], consequence: str, writes_a_file: bool
) -> None:
    """Commands that write never lose anything silently: tensors no layout explains, broken modules
    and error-level orphans stop them. A command that writes an adapter (`writes_a_file`) would
    also drop warning-level orphans other than alphas, so those stop it too."""
    if unexplained:
        raise error(
            f"{adapter.source.path}: {len(unexplained)} tensor(s) no layout explains (e.g. {unexplained[0]!r}); "
            f"{consequence}"
        )
    for orphan in adapter.orphans:
        dropped = writes_a_file and orphan.severity == "warning" and not orphan.key.endswith("alpha")
        if orphan.severity == "error" or dropped:
            raise error(f"{orphan.module}: {orphan.reason}")
    for module in adapter.modules.values():
        if module.problem:
            raise error(f"{module.name}: {module.problem}")
        if module.table_shape is not None:
            raise error(f"{module.name}: {table_misfit(adapter, module)}")


def table_misfit(adapter: Adapter, module: AdapterModule) -> str:
    """Why a module's widths rule out what its name means in the adapter's architecture."""
    arch = adapter.arch
    title = f"{arch.name} ({arch.title})" if arch is not None else "the architecture"
    return (
        f"factors give a {shape_text(module.weight_shape)} update, but {title} has "
        f"{shape_text(module.table_shape or ())} for {compact_targets(module.targets)}: this module is not "
        f"{getattr(arch, 'title', 'that model')}'s (another model with the same names, or a wrong --arch)"
    )


def compact_targets(targets: tuple[str, ...]) -> str:
    """`a.b.{q,k,v}` for several targets that share a path."""
    if len(targets) <= 1:
        return targets[0] if targets else ""
    split = [t.split(".") for t in targets]
    common = os.path.commonprefix(split)  # noqa: RUF071 - lists of path parts, not strings
    tails = [".".join(s[len(common) :]) for s in split]
    return ".".join(common) + ".{" + ",".join(tails) + "}"
