"""Factor shapes as evidence: whether a LoRA's modules have the widths a table gives them.

Names overlap between families (SD3.5 and HunyuanVideo 1.5 use Flux.1's diffusers names at 1536
and 2048 channels where Flux.1 has 3072), so a family whose table widths disagree with most of
the modules it names is not that file's model, however many names it knows. A real model's LoRA
has the real widths; reduced models built from small configs (tests, toys) have widths far below
any table's, and only the kind of layer and the ratio of widths are weighed for them. An update
many times wider than the table's layer is a broken module (inspect's shape-mismatch), not another
model.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from .table import Architecture, Targets

# A file whose modules are, in the median, narrower than this share of the table's widths is a
# reduced model (a test model's few dozen channels against thousands): its widths are not compared.
REDUCED_BELOW = 0.25
# An update wider than this many times the table's layer is broken, not another model's (_larger).
BROKEN_ABOVE = 4

Shape = tuple[int, ...]
ANY = -1  # a width the factors do not fix (kinds.base.ANY: IA3's vector fixes one of the two)


def same_type(implied: Shape | None, full: Shape) -> bool:
    """Whether factors can belong to the table's kind of layer: a Linear, or a conv with the same
    kernel. 4-D factors of a 1x1 conv rule out a Linear (SD1's `proj_in` is a Linear in SD2); 2-D
    ones rule out nothing, since LyCORIS flattens 1x1 convs."""
    if implied is None:
        return False
    if len(implied) == 2 and all(k == 1 for k in full[2:]):
        return True
    return len(implied) == len(full) and implied[2:] == full[2:]


def same_proportions(implied: Shape | None, full: Shape) -> bool:
    """Whether factors have the table's ratio of output to input width: scale-free evidence that
    tells families apart at any width (a Flux.1 `linear1` has 7x its input's rows, Flux.2's 9x;
    an MLP widens 4x in one family and 6x in another), even for narrow test models."""
    if implied is None or len(implied) < 2 or len(full) < 2:
        return implied == full
    return same_type(implied, full) and implied[0] * full[1] == full[0] * implied[1]


def same_shape(implied: Shape | None, full: Shape) -> bool:
    """Whether factors have the table's full-size shape (a 1x1 conv's as a flattened Linear too)."""
    if implied is not None and len(implied) == 2 and len(full) > 2 and all(k == 1 for k in full[2:]):
        return implied == full[:2]
    return implied == full


def full_shape(arch: Architecture, targets: Targets) -> Shape:
    """The full-size shape of one module, or of the fused weight whose row blocks are `targets`."""
    first = arch.modules[targets[0]].shape
    return (sum(arch.modules[t].shape[0] for t in targets), *first[1:]) if len(targets) > 1 else first


def _widths_fit(implied: Shape, full: Shape) -> bool:
    """The full-size check, on the widths the factors fix (IA3's vector fixes one of the two)."""
    if ANY not in implied:
        return same_shape(implied, full)
    flat = implied if len(implied) == len(full) else (*implied, *full[len(implied) :])
    return all(i in (ANY, f) for i, f in zip(flat, full, strict=False)) and len(flat) == len(full)


def _width_share(implied: Shape, full: Shape) -> float | None:
    """How wide the factors are against the table: the smaller of the two widths' shares (a
    reduced model keeps some widths, such as 4 latent channels or T5's 4096, and shrinks the rest)."""
    if len(implied) > 1 and len(full) > 1 and ANY not in implied[:2] and full[0] > 0 and full[1] > 0:
        return min(implied[0] / full[0], implied[1] / full[1])  # the common case, asked of every module
    shares = [i / f for i, f in zip(implied[:2], full[:2], strict=False) if i != ANY and f > 0]
    return min(shares) if shares else None


Pairs = list[tuple[str, Shape | None, Shape]]  # per module: name, the factors' shape, the table's


def shape_pairs(
    arch: Architecture, resolved: dict[str, Targets], implied_shape: Callable[[str], Shape | None]
) -> Pairs:
    """The factors' and the table's shape of each module a table names: what every fit weighs."""
    specs = arch.modules
    return [
        (n, implied_shape(n), specs[t[0]].shape if len(t) == 1 else full_shape(arch, t)) for n, t in resolved.items()
    ]


@dataclass
class TableFit:
    """How a table's widths fit the modules it names in one file."""

    reduced: bool  # a reduced model: widths far below the table's, not compared
    checked: int  # modules whose factors fit together, so have a shape to compare
    misfits: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)  # name -> (factors', table's)

    @property
    def rejected(self) -> bool:
        """Most of the modules it names have other widths: not this file's model."""
        return 2 * len(self.misfits) > self.checked

    def example(self) -> str:
        name, (found, expected) = next(iter(self.misfits.items()))
        return f"{name}: factors {shape_text(found)}, table {shape_text(expected)}"


def table_fit(pairs: Pairs) -> TableFit:
    pairs = [(n, implied, full) for n, implied, full in pairs if implied is not None]
    shares = [s for _, implied, full in pairs if (s := _width_share(implied, full)) is not None]
    reduced = not shares or statistics.median(shares) < REDUCED_BELOW
    fit = TableFit(reduced, len(pairs))
    if not reduced:
        fit.misfits = {
            n: (implied, full)
            for n, implied, full in pairs
            if not _widths_fit(implied, full) and not _larger(implied, full)
        }
    return fit


def _larger(implied: Shape, full: Shape) -> bool:
    """An update many times wider than the layer (a LoKr whose Kronecker product is 16x the layer, a
    32x32 kernel for a 3x3 conv): a broken module, which inspect reports as such, rather than
    evidence of another model (whose widths differ by a few times at most: 1536, 2048, 3072)."""
    return any(i > BROKEN_ABOVE * f for i, f in zip(implied, full, strict=False) if i != ANY)


def shape_text(shape: Shape) -> str:
    return "x".join("?" if n == ANY else str(n) for n in shape)
