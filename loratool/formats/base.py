"""What every format codec does, and the assembly steps they share.

A codec first *claims* the keys its layout explains (cheap: names only), so detection can score
every codec on the same file; the winner then *reads* the file into an `Adapter`. Grouping tensors
into modules, asking the kinds which tensors they are, and placing modules on an architecture are
the same for every layout and live here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache

from ..adapter import Adapter, AdapterModule, Orphan, Piece
from ..archs import ArchDetection, detect
from ..archs.catalog import get_catalog
from ..io.source import TensorSource
from ..kinds import KINDS, Kind, dora, suffix_table

# Tensors that modify a module of any kind rather than being one of its factors.
MODIFIERS: dict[str, dict[str, str]] = {
    "kohya": {"alpha": "alpha", dora.NAMES["kohya"]: dora.ROLE},
    "peft": {"alpha": "alpha", dora.NAMES["peft"]: dora.ROLE},
    "legacy": {},
    "mlx": {dora.NAMES["mlx"]: dora.ROLE},
    "lora_diffusion": {},
    "bfl": {},
    "diffsynth": {},
}


@dataclass
class Claim:
    """The keys one codec explains: key -> (module name as written, tensor suffix)."""

    codec: Codec
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # explained keys that are not adapter tensors

    @property
    def count(self) -> int:
        return len(self.keys) + len(self.extra)


class Codec(ABC):
    name: str  # the format name reported to users
    alpha_convention = "tensor"  # where the layout keeps alpha: tensor | config | none | scale (the scale itself, mlx)

    @abstractmethod
    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        """Build the adapter from the keys this codec claimed (on `arch` when the user named it)."""

    def verdict(self, key: str) -> tuple[str, str] | str | None:
        """For a layout that explains a key by its name alone: (module, suffix) for an adapter
        tensor, what it is for another tensor the layout explains, None for a key it does not."""
        raise NotImplementedError(f"{self.name} claims keys by more than their names")

    def claim(self, source: TensorSource) -> Claim:
        """Explain what you can of the file's keys, by name alone: by default every key by its
        `verdict`, remembered per key name (the files of a library repeat their key names, and every
        codec is asked about every key of every file); layouts that need more override this."""
        catalog, verdicts = self.__dict__.get("_verdicts", (None, {}))
        if catalog is not get_catalog() or len(verdicts) > VERDICTS_KEPT:  # they hold for one set of tables
            catalog, verdicts = get_catalog(), {}
            self.__dict__["_verdicts"] = (catalog, verdicts)
        claim = Claim(self)
        for key in source:
            found = verdicts.get(key, _UNSEEN)
            if found is _UNSEEN:
                found = verdicts[key] = self.verdict(key)
            if found is None:
                continue
            if type(found) is tuple:
                claim.keys[key] = found
            else:
                claim.extra[key] = found
        return claim


VERDICTS_KEPT = 1 << 18  # key names a codec remembers before it starts over (bounded memory on any library)
_UNSEEN = object()


class Suffixes:
    """Tensor-name suffixes (`lora_A.weight`, `alpha`), matched on dot boundaries by set lookups of
    a key's last parts, most parts first: the longest match, without trying every suffix on every key.
    One instance per set of suffixes, remembering its answers: the files of a library repeat the
    same tensor names, and every codec's claim asks about every key."""

    def __init__(self, suffixes: frozenset[str]) -> None:
        self.names = suffixes
        self.most_parts = max((s.count(".") + 1 for s in self.names), default=0)
        self.split = lru_cache(maxsize=1 << 16)(self._split)

    def _split(self, key: str) -> tuple[str, str] | None:
        found = None
        cut = len(key)
        for _ in range(self.most_parts):  # one more part each time: the last match is the longest
            cut = key.rfind(".", 0, cut)
            if cut <= 0:  # no dot left, or nothing before it to be the module
                break
            if key[cut + 1 :] in self.names:
                found = (key[:cut], key[cut + 1 :])
        return found


def split_dotted(key: str, suffixes: Suffixes) -> tuple[str, str] | None:
    """`path.to.module.lora_A.weight` -> (`path.to.module`, `lora_A.weight`), longest suffix first."""
    return suffixes.split(key)


def suffixes_longest_first(*tables: Mapping[str, object]) -> Suffixes:
    return _suffixes(frozenset(s for t in tables for s in t))


@cache
def _suffixes(names: frozenset[str]) -> Suffixes:
    return Suffixes(names)


def group_by_module(claimed: dict[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
    modules: dict[str, dict[str, str]] = {}
    for key, (module, suffix) in claimed.items():
        modules.setdefault(module, {})[suffix] = key
    return modules


def build_modules(
    source: TensorSource,
    claimed: dict[str, tuple[str, str]],
    schemes: tuple[str, ...],
) -> tuple[dict[str, AdapterModule], list[Orphan]]:
    """Group tensors into modules and let the kinds say which module each set of tensors is."""
    table: dict[str, tuple[Kind, str]] = {}
    modifiers: dict[str, str] = {}
    for scheme in schemes:
        table.update(suffix_table(scheme))
        modifiers.update(MODIFIERS[scheme])
    modules: dict[str, AdapterModule] = {}
    orphans: list[Orphan] = []
    for name, by_suffix in group_by_module(claimed).items():
        kinds = {table[s][0].name: table[s][0] for s in by_suffix if s in table}
        # A bias difference beside a LoRA's factors (lightx2v's Wan distillation LoRAs): the LoRA's bias,
        # applied as ComfyUI applies `diff_b`, at strength alone.
        full = {s for s in by_suffix if s in table and table[s][0].name == "full"}
        bias_unscaled = set(kinds) == {"lora", "full"} and full == {"diff_b"}
        if bias_unscaled:
            del kinds["full"]
        factor_keys = {s: k for s, k in by_suffix.items() if s in table}
        mods = {modifiers[s]: k for s, k in by_suffix.items() if s in modifiers}
        if len(kinds) != 1:
            why = (
                f"{', '.join(sorted(mods)) or 'tensor'} without any factors"
                if not kinds
                else f"tensors of several kinds ({', '.join(sorted(kinds))}) under one module name"
            )
            severity = "warning" if not kinds else "error"
            orphans.extend(Orphan(k, name, why, severity) for k in by_suffix.values())
            continue
        kind = next(iter(kinds.values()))
        keys = {table[s][1]: k for s, k in factor_keys.items()}
        missing = kind.missing(set(keys))
        if missing:
            why = f"{kind.label} module without {', '.join(missing)}"
            orphans.extend(Orphan(k, name, why) for k in by_suffix.values())
            continue
        keys = kind.refine(keys, lambda key: source.info(key).numel, source.scalar)
        if kind.alpha_role is not None and "alpha" in mods:
            keys[kind.alpha_role] = mods["alpha"]
        if dora.ROLE in mods:
            keys[dora.ROLE] = mods[dora.ROLE]
        pieces = {role: piece_of(source, k) for role, k in keys.items()}
        kind = KINDS[kind.variant({role: p.shape for role, p in pieces.items()})]
        module = AdapterModule(name=name, kind=kind, pieces=pieces)
        module.dora_columns = dora.per_column(module.dora_key, module.dora_shape)
        module.bias_unscaled = bias_unscaled
        if "alpha" in mods:
            info = source.info(mods["alpha"])
            module.alpha_key, module.alpha_dtype = mods["alpha"], info.dtype
            if info.numel == 1:
                module.alpha = source.scalar(mods["alpha"])
                module.alpha_source = "tensor"
            else:
                orphans.append(Orphan(mods["alpha"], name, f"alpha has {info.numel} values, expected one"))
        modules[name] = module
    return modules, orphans


def implied_shapes(modules: dict[str, AdapterModule]) -> dict[str, tuple[int, ...] | None]:
    """The weight shape each module's factors imply (None when they do not fit together): what
    detection weighs against the tables."""
    return {name: None if m.shape_problem else m.weight_shape for name, m in modules.items()}


def place_on_architecture(
    modules: dict[str, AdapterModule],
    scheme: str,
    metadata: dict[str, str],
    names: Callable[[str], str] = lambda name: name,
    hf_name_hint: str | None = None,
    only: str | None = None,
) -> ArchDetection:
    """Detect the architecture from module names and record each module's canonical targets.

    `names` maps a module name as written to the name the architecture index uses (codecs whose
    keys carry a wrapper prefix strip it here).
    """
    lookup = {names(m): m for m in modules}
    shapes = implied_shapes(modules)
    implied = {index_name: shapes[name] for index_name, name in lookup.items()}
    found = detect(list(lookup), scheme, metadata, implied.get, hf_name_hint, only)
    for index_name, targets in found.resolved.items():
        module = modules[lookup[index_name]]
        module.targets = targets
        module.component = found.arch.component_of(targets[0])
        if index_name in found.misfits:
            module.table_shape = found.misfits[index_name][1]
    return found


def piece_of(source: TensorSource, key: str) -> Piece:
    info = source.info(key)
    return Piece(info.dtype, info.shape, key)
