"""The only module that prints: rich tables for people, JSON for programs, progress bars on stderr."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .progress import Progress as ProgressCallback
from .progress import Step

if TYPE_CHECKING:  # reports are rendered, never built here: their modules (and torch) load with the command
    from .commands.combine import CombineReport
    from .commands.convert import ConvertReport
    from .commands.extract import ExtractReport
    from .commands.inspect import InspectReport
    from .commands.merge import MergeReport
    from .commands.resize import ResizeReport

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
MAX_LISTED_FINDINGS = 12


class _StdoutConsole(Console):
    def on_broken_pipe(self) -> None:
        """Rich would exit 1 (our "findings" code); the CLI's handler gives the SIGPIPE code."""
        raise BrokenPipeError


def stdout_console() -> Console:
    return _StdoutConsole(file=sys.stdout, soft_wrap=False)


def print_json(document: object, stream: TextIO | None = None) -> None:
    """Strict JSON (non-finite numbers become the strings "nan", "inf", "-inf"), written in one piece."""
    (stream or sys.stdout).write(_strict_json(document, indent=2) + "\n")


def print_json_line(document: object, stream: TextIO | None = None) -> None:
    """One strict JSON document on one line (JSON Lines: one per file of a scan)."""
    (stream or sys.stdout).write(_strict_json(document, separators=(",", ":")) + "\n")


def inspect_json_line(report: InspectReport) -> str:
    """A report as its JSON line (what a scan's worker processes hand back)."""
    return _strict_json(report.to_json(), separators=(",", ":"))


def _strict_json(document: object, **layout: object) -> str:
    try:
        return json.dumps(document, allow_nan=False, **layout)
    except ValueError:  # a non-finite number somewhere: spelled as a string (rare, so no walk up front)
        return json.dumps(_finite_json(document), allow_nan=False, **layout)


def inspect_line(report: InspectReport) -> str:
    """One file of a library scan on one line: what it is, for what, how it is built, what is wrong."""
    s = report.summary
    arch = s["architecture"]["name"] or "unknown architecture"
    found = s["findings"]
    parts = [
        report.format,
        arch,
        f"{s['modules']} modules",
        "rank " + _fmt_counts(s["ranks"], 3),
        "alpha " + _fmt_counts(s["alphas"], 3),
        _fmt_counts(s["dtypes"], 3),
        f"{found['error']} errors, {found['warning']} warnings",
    ]
    return f"{report.path}: " + "; ".join(parts)


def _finite_json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A bar on stderr: items done of total (tensors, or modules), bytes, bytes/s and time left.

    Yields the callback to give the command, or None when disabled or when stderr is not a
    terminal (a log file gets no control sequences).
    """
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[items]}"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=None, items="")

        def update(step: Step) -> None:
            items = f"{step.done}/{step.total} {step.unit}"
            bar.update(task, completed=step.bytes_done, total=step.bytes_total, items=items)

        yield update


def _fmt_counts(counts: dict[str, int], limit: int = 6) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} ({n})" if len(counts) > 1 else k for k, n in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "")


def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render_inspect(report: InspectReport, console: Console, show_keys: bool) -> None:
    s = report.summary
    fmt = s["format"]
    arch = s["architecture"]
    overview = Table.grid(padding=(0, 2))
    overview.add_column(style="bold")
    overview.add_column(overflow="fold")
    overview.add_row("file", escape(report.path))
    variant = f" [dim]({escape(report.variant)})[/dim]" if report.variant else ""
    share = f"{fmt['keys_explained']:.0%} of keys"
    runner = fmt["runner_up"]
    runner_text = f"; runner-up {runner['name']} {runner['keys_explained']:.0%}" if runner else ""
    overview.add_row("format", f"{report.format}{variant} [dim]{share}{runner_text}[/dim]")
    arch_text = arch["name"] or "unknown"
    if arch["title"]:
        arch_text += f" [dim]({escape(arch['title'])})[/dim]"
    overview.add_row("architecture", arch_text)
    overview.add_row("", f"[dim]{escape(arch['reason'])}[/dim]")
    if arch.get("candidates") and len(arch["candidates"]) > 1:
        overview.add_row("", f"[dim]same module names as: {', '.join(arch['candidates'][1:])}[/dim]")
    if report.base:
        overview.add_row("base", escape(report.base))
    overview.add_row("modules", f"{s['modules']}: {_fmt_counts(s['components'])}")
    overview.add_row("kinds", _fmt_counts(s["kinds"]))
    overview.add_row("rank", _fmt_counts(s["ranks"]))
    if s["block_sizes"]:
        overview.add_row("block size", _fmt_counts(s["block_sizes"]))
    overview.add_row("alpha", _fmt_counts(s["alphas"]))
    overview.add_row("scale", _fmt_counts(s["scales"]) + (" [dim](rsLoRA)[/dim]" if s["rslora"] else ""))
    overview.add_row("dtype", _fmt_counts(s["dtypes"]))
    ratio = s["parameter_ratio"]
    overview.add_row(
        "parameters",
        f"{s['trainable_parameters']:,}"
        + (
            f" [dim]({ratio:.2%} of the {s['targeted_base_parameters']:,} targeted base weights)[/dim]" if ratio else ""
        ),
    )
    overview.add_row("size", f"{_fmt_size(s['file_size'])}, {s['tensors']} tensors")
    if report.header_only:
        overview.add_row("checked", "[dim]the header only: no norms, value checks or hash check[/dim]")
    if s["other_tensors"]:
        kinds = Counter(s["other_tensors"].values())
        overview.add_row("other tensors", "; ".join(f"{n} x {escape(what)}" for what, n in kinds.items()))
    for key, value in s["metadata"].items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        overview.add_row(key, escape(text if len(text) <= 200 else text[:197] + "..."))
    console.print(overview)
    if show_keys:
        console.print(_modules_table(report))
    _render_findings(report, console)


def _modules_table(report: InspectReport) -> Table:
    """Module name with its canonical target beneath it, so the numbers keep their columns at 80 wide."""
    table = Table(title="modules", title_justify="left", pad_edge=False, show_lines=False)
    table.add_column("module -> target", overflow="fold", ratio=1)
    for col in ("kind", "rank", "alpha", "scale", "dtype", "shape", "‖ΔW‖"):
        table.add_column(col, justify="left" if col in ("kind", "dtype", "shape") else "right", no_wrap=True)
    for m in report.modules:
        target = escape(m.target) if m.target else "[red]not in the architecture[/red]"
        table.add_row(
            f"{escape(m.name)}\n[dim]-> {target}[/dim]" if m.target != m.name else escape(m.name),
            m.kind,
            str(m.rank or (f"b{m.block_size}" if m.block_size else "-")),
            "-" if m.alpha is None else f"{m.alpha:g}",
            "-" if m.scale is None else f"{m.scale:.4g}",
            m.dtype,
            "x".join("?" if n is None else str(n) for n in m.shape),
            "-" if m.dw_norm is None else f"{m.dw_norm:.3g}",
        )
    return table


def _render_findings(report: InspectReport, console: Console) -> None:
    counts = report.summary["findings"]
    if not report.findings:
        console.print("[green]no findings[/green]")
        return
    head = ", ".join(f"[{SEVERITY_STYLE[k]}]{n} {k}{'s' if n != 1 else ''}[/]" for k, n in counts.items() if n)
    console.print(f"findings: {head}")
    if len(report.findings) <= MAX_LISTED_FINDINGS:
        for f in report.findings:
            where = f" [bold]{escape(f.module)}[/bold]" if f.module else ""
            console.print(f"  [{SEVERITY_STYLE[f.severity]}]{f.severity}[/] {f.code}{where}: {escape(f.message)}")
        return
    by_code = Counter((f.severity, f.code) for f in report.findings)
    for (severity, code), n in by_code.items():
        first = next(f for f in report.findings if f.code == code and f.severity == severity)
        where = f" e.g. [bold]{escape(first.module)}[/bold]" if first.module else ""
        console.print(f"  [{SEVERITY_STYLE[severity]}]{severity}[/] {code} x{n}{where}: {escape(first.message)}")
    console.print("  [dim]every finding: --json[/dim]")


MAX_LISTED_NOTES = 12


def render_convert(report: ConvertReport, console: Console) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("from", f"{escape(report.source)} [dim]({report.source_format}, {report.architecture})[/dim]")
    grid.add_row("to", f"{escape(report.dest)} [dim]({report.target})[/dim]")
    grid.add_row("modules", f"{report.modules_in} in, {report.modules_out} out")
    grid.add_row(
        "tensors",
        f"{report.tensors_copied} copied byte for byte, {report.tensors_computed} computed; "
        f"{_fmt_size(report.bytes_written)}",
    )
    console.print(grid)
    for note in report.notes[:MAX_LISTED_NOTES]:
        console.print(f"  [dim]{escape(note)}[/dim]")
    if len(report.notes) > MAX_LISTED_NOTES:
        console.print(f"  [dim]+{len(report.notes) - MAX_LISTED_NOTES} more notes (--json lists all)[/dim]")


def render_merge(report: MergeReport, console: Console) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("base", escape(report.base))
    for lora in report.loras:
        unmatched = f", [yellow]{len(lora.unmatched)} unmatched[/yellow]" if lora.unmatched else ""
        grid.add_row(
            "lora",
            f"{escape(lora.path)} x {lora.strength:g} [dim]({lora.format}, {lora.architecture})[/dim]: "
            f"{lora.matched} of {lora.modules} modules matched{unmatched}",
        )
    grid.add_row("to", f"{escape(report.dest)} [dim]({report.device}, dtype {report.dtype})[/dim]")
    grid.add_row(
        "tensors",
        f"{report.tensors_updated} updated, {report.tensors_copied} copied byte for byte"
        + (f", {report.tensors_cast} cast" if report.tensors_cast else "")
        + f"; {_fmt_size(report.bytes_written)} in {report.files_written} file(s)",
    )
    console.print(grid)
    for lora in report.loras:
        for name in lora.unmatched[:MAX_LISTED_NOTES]:
            console.print(f"  [yellow]unmatched[/yellow] {escape(name)} [dim]({escape(lora.path)})[/dim]")
        if len(lora.unmatched) > MAX_LISTED_NOTES:
            console.print(f"  [dim]+{len(lora.unmatched) - MAX_LISTED_NOTES} more unmatched (--json lists all)[/dim]")
        for note in lora.notes[:MAX_LISTED_NOTES]:
            console.print(f"  [dim]{escape(note)}[/dim]")
    for path in report.skipped:
        console.print(f"  [dim]left out {escape(path)}: weights the merge does not read (another variant)[/dim]")


def render_combine(report: CombineReport, console: Console) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for source, weight in zip(report.sources, report.weights, strict=True):
        grid.add_row("lora", f"{escape(source)} x {weight:g}")
    grid.add_row("to", f"{escape(report.dest)} [dim]({report.target}, {report.architecture})[/dim]")
    how = "exact sum (ranks add up)" if report.rank is None else f"best rank-{report.rank} approximation"
    grid.add_row(
        "modules",
        f"{report.modules_out} written, {report.modules_shared} shared by several LoRAs; {how}; "
        f"{_fmt_size(report.bytes_written)}",
    )
    console.print(grid)
    for note in report.notes[:MAX_LISTED_NOTES]:
        console.print(f"  [dim]{escape(note)}[/dim]")


def _energy_row(retained: list[float], errors: list[float]) -> str:
    if not retained:
        return "-"
    return (
        f"retained energy min {min(retained):.4f}, mean {sum(retained) / len(retained):.4f}; "
        f"relative error max {max(errors):.4f}"
    )


def _modules_by_rank(ranks: list[int]) -> str:
    counts = Counter(ranks)
    return ", ".join(f"{n} at rank {r}" for r, n in sorted(counts.items(), reverse=True))


def render_extract(report: ExtractReport, console: Console, show_modules: bool) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("base", f"{escape(report.base)} [dim]({report.architecture})[/dim]")
    grid.add_row("tuned", escape(report.tuned))
    svd = "exact SVD" if report.exact else "randomized SVD"
    grid.add_row("to", f"{escape(report.dest)} [dim]({report.target}, {report.method}, {svd}, {report.device})[/dim]")
    grid.add_row("modules", f"{len(report.modules)} extracted ({_modules_by_rank([m.rank for m in report.modules])})")
    grid.add_row(
        "quality", _energy_row([m.retained for m in report.modules], [m.relative_error for m in report.modules])
    )
    if report.skipped:
        grid.add_row("skipped", f"{len(report.skipped)} unchanged or below --min-diff")
    grid.add_row("size", _fmt_size(report.bytes_written))
    console.print(grid)
    if show_modules:
        table = Table(box=None, pad_edge=False)
        for title in ("module", "rank", "retained", "rel. error", "change"):
            table.add_column(title, justify="left" if title == "module" else "right", overflow="fold")
        for m in report.modules:
            table.add_row(
                escape(m.name), str(m.rank), f"{m.retained:.4f}", f"{m.relative_error:.4f}", f"{m.change:.3g}"
            )
        console.print(table)
    for m in report.skipped[:MAX_LISTED_NOTES]:
        console.print(f"  [dim]skipped {escape(m.name)}: change {m.change:.3g}[/dim]")
    if len(report.skipped) > MAX_LISTED_NOTES:
        console.print(f"  [dim]+{len(report.skipped) - MAX_LISTED_NOTES} more skipped (--json lists all)[/dim]")


def render_resize(report: ResizeReport, console: Console, show_modules: bool) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("from", escape(report.source))
    grid.add_row("to", f"{escape(report.dest)} [dim]({report.target}, {report.method})[/dim]")
    cut = [m for m in report.modules if m.rank_out < m.rank_in]
    grid.add_row(
        "modules",
        f"{len(cut)} cut, {len(report.modules) - len(cut)} unchanged "
        f"({_modules_by_rank([m.rank_out for m in report.modules])})",
    )
    grid.add_row(
        "quality", _energy_row([m.retained for m in report.modules], [m.relative_error for m in report.modules])
    )
    grid.add_row("size", _fmt_size(report.bytes_written))
    console.print(grid)
    if show_modules:
        table = Table(box=None, pad_edge=False)
        for title in ("module", "rank", "retained", "rel. error"):
            table.add_column(title, justify="left" if title == "module" else "right", overflow="fold")
        for m in report.modules:
            table.add_row(
                escape(m.name), f"{m.rank_in} -> {m.rank_out}", f"{m.retained:.4f}", f"{m.relative_error:.4f}"
            )
        console.print(table)
