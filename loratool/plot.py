"""Pictures of a report, for when looking beats reading: where an adapter changes the model, how
much of its rank it uses, and what an extraction kept.

matplotlib is an optional extra (`pip install "loratool[plot]"`), imported only when a picture is
drawn; `require_matplotlib` lets a command refuse up front, before any long work, when it is absent.
Figures are built with matplotlib's object API (no pyplot state, no display needed) and written
through a temporary file, like every other output.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .archs.blocks import block_of, component_position, model_position
from .commands.extract import ExtractReport
from .commands.inspect import InspectReport, ModuleReport
from .errors import MissingDependencyError, OutputError
from .io.atomic import atomic_write_bytes
from .io.destination import check_destination

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COMPONENT_COLORS = {
    "te": "#4c72b0",
    "te1": "#4c72b0",
    "te2": "#64b5cd",
    "t5": "#8172b2",
    "unet": "#dd8452",
    "transformer": "#c44e52",
    "model": "#55a868",
}
OTHER_COLOR = "#8c8c8c"
MAX_SPECTRA = 400  # lines in the spectrum panel; the largest updates are drawn when there are more
DPI = 110


@dataclass(frozen=True)
class Block:
    """One bar of the inspect plot: the update of every module in a block, taken together."""

    component: str
    label: str
    norm: float  # sqrt of the sum of the modules' squared ||dW||_F: the block's update as one vector
    modules: int


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError('--plot needs matplotlib: pip install "loratool[plot]"')


def block_norms(modules: Iterable[ModuleReport]) -> list[Block]:
    """Per component and block, the combined size of the update, in model order."""
    squares: dict[tuple[str, str], tuple[float, int]] = {}
    position: dict[tuple[str, str], tuple] = {}
    for m in modules:
        if m.dw_norm is None:
            continue  # IA3/GLoRA scale the base weights: no update of their own to measure
        component = m.component or "unknown"
        path = m.targets[0] if m.targets else m.name
        key = (component, block_of(path)[2])
        position.setdefault(key, model_position(component, path))
        total, count = squares.get(key, (0.0, 0))
        squares[key] = (total + m.dw_norm**2, count + 1)
    ordered = sorted(squares.items(), key=lambda kv: position[kv[0]])
    return [Block(c, label, math.sqrt(total), n) for (c, label), (total, n) in ordered]


def _color(component: str | None) -> str:
    return COMPONENT_COLORS.get(component or "", OTHER_COLOR)


def _new_figure(width: float, height: float, rows: int) -> tuple[Figure, list]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    return figure, list(axes)


def _legend(axis, components: Iterable[str | None]) -> None:
    from matplotlib.patches import Patch

    seen = sorted(set(components), key=component_position)
    handles = [Patch(color=_color(c), label=c or "unknown") for c in seen]
    axis.legend(handles=handles, loc="upper right", fontsize="small", frameon=False)


def inspect_figure(report: InspectReport) -> Figure:
    """Per-block size of the update (bars, one colour per component) above the singular values of
    each module's update, normalised to its largest (how much of the rank each module uses)."""
    figure, (bars, spectra) = _new_figure(12, 8, 2)
    name = Path(report.path).name
    figure.suptitle(f"{name}: {report.format}, {report.architecture or 'unknown architecture'}")

    blocks = block_norms(report.modules)
    if blocks:
        x = range(len(blocks))
        bars.bar(x, [b.norm for b in blocks], color=[_color(b.component) for b in blocks])
        bars.set_xticks(list(x), [b.label for b in blocks], rotation=90, fontsize="x-small")
        bars.set_xlim(-0.6, len(blocks) - 0.4)
        _legend(bars, (b.component for b in blocks))
    else:
        bars.text(0.5, 0.5, "no module has an update of its own", ha="center", va="center")
    bars.set_ylabel("‖ΔW‖ per block (Frobenius)")
    bars.set_title("where the update goes", loc="left", fontsize="medium")

    from matplotlib.ticker import MaxNLocator

    low_rank = [m for m in report.modules if m.singular_values and m.singular_values[0] > 0]
    low_rank.sort(key=lambda m: -(m.dw_norm or 0.0))
    drawn = low_rank[:MAX_SPECTRA]
    for m in drawn:
        s = m.singular_values or []
        top = s[0]
        values = [max(v / top, 1e-12) for v in s]
        spectra.plot(range(1, len(values) + 1), values, color=_color(m.component), alpha=0.35, linewidth=0.8)
    if drawn:
        spectra.set_yscale("log")
        spectra.xaxis.set_major_locator(MaxNLocator(integer=True))
        spectra.set_xlabel("singular value index")
        _legend(spectra, (m.component for m in drawn))
        more = f" (the {len(drawn)} largest of {len(low_rank)})" if len(low_rank) > len(drawn) else ""
        title = f"singular values of each module's ΔW / its largest{more}"
    else:
        spectra.text(0.5, 0.5, "no low-rank module (LoHa, LoKr and full diffs have no factor spectrum)", ha="center")
        title = "singular values"
    spectra.set_ylabel("σᵢ / σ₁")
    spectra.set_title(title, loc="left", fontsize="medium")
    return figure


def extract_figure(report: ExtractReport) -> Figure:
    """Retained energy per extracted module (how much of TUNED - BASE the LoRA keeps) above the
    rank each module got."""
    figure, (energy, ranks) = _new_figure(12, 7, 2)
    figure.suptitle(f"{Path(report.dest).name}: extracted at {report.method} from {Path(report.tuned).name}")
    modules = sorted(report.modules, key=lambda m: model_position(m.component, m.target or m.name))
    x = list(range(len(modules)))
    colors = [_color(m.component) for m in modules]
    energy.bar(x, [m.retained for m in modules], width=1.0, color=colors)
    energy.set_ylim(0, 1.02)
    energy.set_ylabel("retained energy")
    mean = sum(m.retained for m in modules) / len(modules) if modules else 0.0
    energy.axhline(mean, color="black", linewidth=0.8, linestyle="--")
    energy.set_title(f"share of ‖TUNED − BASE‖² kept per module (mean {mean:.3f}, dashed)", loc="left")
    ranks.bar(x, [m.rank for m in modules], width=1.0, color=colors)
    ranks.set_ylabel("rank")
    ranks.set_xlabel("module (in model order)")
    for axis in (energy, ranks):
        axis.set_xlim(-0.5, len(modules) - 0.5)
        _block_ticks(axis, [m.target or m.name for m in modules])
    _legend(energy, (m.component for m in modules))
    return figure


def _block_ticks(axis, names: list[str]) -> None:
    """One tick where each block starts, so hundreds of modules stay legible."""
    ticks, labels, last = [], [], None
    for i, name in enumerate(names):
        label = block_of(name)[2]
        if label != last:
            ticks.append(i)
            labels.append(label)
            last = label
    axis.set_xticks(ticks, labels, rotation=90, fontsize="x-small")


def check_plot_destination(plot: str, inputs: list[str | None], force: bool) -> None:
    """Refuse a --plot path before any work: matplotlib missing, not a .png, or not writable."""
    require_matplotlib()
    if Path(plot).suffix.lower() != ".png":
        raise OutputError(f"{plot}: --plot writes a PNG; give a path ending in .png")
    check_destination([Path(p) for p in inputs if p is not None], Path(plot), force, directory=False)


def save_plot(report: InspectReport | ExtractReport, path: str | os.PathLike) -> Path:
    """The picture a command's `--plot` asks for: inspect's or extract's."""
    figure = inspect_figure(report) if isinstance(report, InspectReport) else extract_figure(report)
    return save_png(figure, path)


def save_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Render to memory, then write beside `path` and rename: a failed write leaves no half PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return atomic_write_bytes(path, buffer.getvalue())
