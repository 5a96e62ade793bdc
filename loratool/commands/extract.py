"""extract: a LoRA from a fine-tuned checkpoint and its base, one module at a time.

The walk: open both checkpoints (headers only) -> learn the model from the base -> plan one job per
output module, in the base's key order -> for each job read both weights (the next job's are read
while this one computes), take D = tuned - base in fp32 on the device, skip it when the change is
below --min-diff, cut D to its top singular triplets (randomized by default, see ops/svd.py) and
split them evenly between up and down -> write the layout's file. Memory holds two weights and
their delta at a time, plus the factors extracted so far (the size of the output).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter import AdapterModule
from ..archs import BaseArchitecture
from ..archs.checkpoint import checkpoint_architecture, checkpoint_misfits
from ..archs.fit import shape_text
from ..errors import ExtractError
from ..extraction.difference import Workspace, difference
from ..extraction.reading import located_bytes, read_ahead
from ..extraction.targets import Job, Selection, plan_jobs
from ..formats import LAYOUTS, Layout
from ..formats.kohya_record import locon_record
from ..io.destination import check_destination
from ..io.source import TensorSource, open_source
from ..kinds import KINDS
from ..lazy_torch import torch
from ..ops.device import resolve_device
from ..ops.fuse import reorder_rows
from ..ops.svd import (
    balanced_factors,
    clamp_quantile,
    dynamic_rank,
    exact_svd,
    random_sketch,
    randomized_svd,
    residual_energy,
    seed_for,
    sketch_width,
    sketches,
)
from ..options import DEFAULT_MAX_RANK
from ..output.factors import rank_rule, stored_piece
from ..output.write import write_output
from ..progress import Progress, Tally

EXTRACTED_KEY = "loratool.extracted_from"
FACTOR_DTYPES = ("F32", "F16", "BF16")  # the tuned weight's dtype when it is one of these, else BF16


@dataclass
class ModuleResult:
    name: str
    rank: int
    retained: float  # share of ||D||_F^2 kept
    relative_error: float  # ||D - D_r||_F / ||D||_F
    change: float  # ||D||_F / ||W_base||_F
    component: str | None = None  # unet, te1, transformer, model, ...
    target: str | None = None  # the first canonical module it updates


@dataclass
class ExtractReport:
    base: str
    tuned: str
    dest: str
    target: str
    architecture: str
    device: str
    method: str  # "rank 16", "fro:0.9 (max rank 64)", ...
    exact: bool
    modules: list[ModuleResult]
    skipped: list[ModuleResult]  # change at or below --min-diff
    bytes_written: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["modules"] = [dict(m.__dict__) for m in self.modules]
        data["skipped"] = [dict(m.__dict__) for m in self.skipped]
        return data


@dataclass
class _Origin:
    """What the layouts carry into the file's metadata and PEFT config."""

    metadata: dict[str, str]
    config: dict | None
    format: str = "extracted"


def extract(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    max_rank: int | None = None,
    conv_rank: int | None = None,
    to: str | None = None,
    alpha: float | None = None,
    min_diff: float = 0.0,
    clamp: float | None = None,
    include: str | None = None,
    exclude: str | None = None,
    exact: bool = False,
    device: str = "auto",
    seed: int = 0,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> ExtractReport:
    """Write a LoRA whose update approximates `tuned - base`, module by module.

    Give `rank`, or `dynamic` ("fro:0.9", "ratio:20", "cumulative:0.9", "eps:1e-3") with an
    optional `max_rank` cap (default 64). kxk convs are extracted only with `conv_rank`. `to` is
    the layout (default kohya for SD/SDXL/Flux, peft for transformers models).
    """
    rule = _check_options(rank, dynamic, max_rank, conv_rank, alpha, min_diff, clamp)
    selection = Selection(
        rank=rank if rank is not None else (max_rank or DEFAULT_MAX_RANK),
        conv_rank=conv_rank,
        include=_regex(include, "--include"),
        exclude=_regex(exclude, "--exclude"),
    )
    torch_device = resolve_device(device)
    base_path, tuned_path = Path(base), Path(tuned)
    with open_source(base_path, allow_pickle) as base_src, open_source(tuned_path, allow_pickle) as tuned_src:
        arch = checkpoint_architecture(base_src)
        tuned_arch = checkpoint_architecture(tuned_src)
        if tuned_arch.name != arch.name:
            raise ExtractError(f"BASE {base_path} is {arch.name} but TUNED {tuned_path} is {tuned_arch.name}")
        misfits = checkpoint_misfits(arch, base_src)
        if misfits:
            module, (stored, table) = next(iter(misfits.items()))
            raise ExtractError(
                f"{module}: {base_path} stores a {shape_text(stored)} weight where {arch.name} ({arch.title}) "
                f"has {shape_text(table)}: not {arch.title}'s module (another model with the same names); "
                "nothing written"
            )
        layout = LAYOUTS[to or arch.default_layout]
        check_destination([base_path, tuned_path], Path(dest), force, directory=layout.is_directory)
        jobs = plan_jobs(arch, base_src, tuned_src, layout, selection)
        _check_components(layout, jobs)
        units: dict[str, AdapterModule] = {}
        results: list[ModuleResult] = []
        skipped: list[ModuleResult] = []
        job_bytes = [located_bytes(job.base, base_src) + located_bytes(job.tuned, tuned_src) for job in jobs]
        tally = Tally(progress, len(jobs), sum(job_bytes), unit="modules")
        space = Workspace()
        for (job, w_base, w_tuned), nbytes in zip(
            read_ahead(jobs, base_src, tuned_src, torch_device), job_bytes, strict=True
        ):
            unit, result = _extract_one(job, w_base, w_tuned, rule, alpha, min_diff, clamp, exact, seed, space)
            result.component = _component_name(arch, job.component)
            result.target = job.targets[0]
            del w_base, w_tuned
            if unit is None:
                skipped.append(result)
            else:
                units[job.name] = unit
                results.append(result)
            tally.advance(nbytes)
        if not units:
            raise ExtractError(
                f"{tuned_path}: no module differs from the base by more than --min-diff {min_diff:g}; "
                "nothing to extract"
            )
        method = _describe(rank, dynamic, selection.rank, conv_rank)
        origin = _origin(arch, layout, base_path, tuned_path, base_src, method, exact, alpha, units)
        # Computed in the base's data order (sequential reads); written in name order, so the same
        # checkpoints give the same file however they are sharded.
        units = dict(sorted(units.items()))
        entries = [e for name, unit in units.items() for e in layout.entries(name, unit, arch)]
        metadata = layout.metadata(units, origin, arch)
        written = write_output(layout, dest, force, None, entries, metadata, units, origin, arch, None)
    return ExtractReport(
        base=str(base_path),
        tuned=str(tuned_path),
        dest=str(dest),
        target=layout.name,
        architecture=arch.name,
        device=str(torch_device),
        method=method,
        exact=exact,
        modules=results,
        skipped=skipped,
        bytes_written=written,
    )


def _check_options(
    rank: int | None,
    dynamic: str | None,
    max_rank: int | None,
    conv_rank: int | None,
    alpha: float | None,
    min_diff: float,
    clamp: float | None,
) -> tuple[str, float] | None:
    rule = rank_rule(rank, dynamic, ExtractError)
    for flag, value in (("--max-rank", max_rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise ExtractError(f"{flag} {value}: must be at least 1")
    if max_rank is not None and dynamic is None:
        raise ExtractError("--max-rank caps a --dynamic rank; with --rank R the rank is R")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ExtractError(f"--alpha {alpha:g}: must be a positive number")
    if not (math.isfinite(min_diff) and min_diff >= 0):
        raise ExtractError(f"--min-diff {min_diff:g}: must be zero or positive")
    if clamp is not None and not 0 < clamp <= 1:
        raise ExtractError(f"--clamp-quantile {clamp:g}: must be in (0, 1]")
    return rule


def _regex(pattern: str | None, flag: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ExtractError(f"{flag} {pattern!r}: not a valid regular expression ({exc})") from None


def _check_components(layout: Layout, jobs: list[Job]) -> None:
    components = sorted({j.component for j in jobs if j.component is not None})
    if layout.single_component and len(components) > 1:
        raise ExtractError(
            f"a PEFT adapter dir wraps one model, and the selected modules span {', '.join(components)}; "
            "use --to diffusers, or --exclude the others (e.g. --exclude '^text_encoder')"
        )


def _component_name(arch: BaseArchitecture, component: str | None) -> str | None:
    return arch.component_label(component)


def _extract_one(
    job: Job,
    w_base: torch.Tensor,
    w_tuned: torch.Tensor,
    rule: tuple[str, float] | None,
    alpha: float | None,
    min_diff: float,
    clamp: float | None,
    exact: bool,
    seed: int,
    space: Workspace,
) -> tuple[AdapterModule | None, ModuleResult]:
    shape = (w_base.shape[0], math.prod(w_base.shape[1:]))
    cap = min(job.rank, *shape)
    randomized = not exact and (rule is None or rule[0] != "cumulative") and sketches(shape, cap)
    generator_seed = seed_for(job.name, seed)
    sketch = None
    if randomized:
        sketch = random_sketch(shape[1], sketch_width(cap), generator_seed, w_tuned.device, torch.float32)
    found = difference(w_base, w_tuned, sketch, space)
    delta, energy = found.delta, found.energy
    if not math.isfinite(energy):
        raise ExtractError(f"{job.name}: TUNED - BASE is not finite here (NaN or inf in one of the checkpoints)")
    delta_norm = math.sqrt(energy)
    base_norm = math.sqrt(found.base_energy)
    change = delta_norm / base_norm if base_norm > 0 else (math.inf if delta_norm > 0 else 0.0)
    if delta_norm == 0.0 or change <= min_diff:
        return None, ModuleResult(job.name, 0, 0.0, 0.0, change)
    delta = reorder_rows(delta, job.swaps_rows, False, job.native_rows)  # to the output layout's order
    matrix = delta.flatten(1)
    if rule is not None and rule[0] == "cumulative":
        svd = exact_svd(matrix)  # sum S[:k] / sum S needs every singular value
    elif exact:
        svd = exact_svd(matrix, cap)
    else:
        sketched = (
            None if found.sketched is None else reorder_rows(found.sketched, job.swaps_rows, False, job.native_rows)
        )
        svd = randomized_svd(matrix, cap, generator_seed, energy=energy, sketched=sketched)
    kept = cap if rule is None else min(cap, dynamic_rank(svd.s, rule[0], rule[1], svd.energy))
    up, down = balanced_factors(svd, kept)
    retained, error = svd.retained(kept), svd.relative_error(kept)
    if clamp is not None:
        up, down = clamp_quantile(up, down, clamp)
        error = math.sqrt(residual_energy(matrix, up, down) / energy)  # the clamp's own error counts
        retained = 1.0 - error**2
    if alpha is not None:  # scale = alpha / r: undo it in the factors so the update is unchanged
        root = math.sqrt(kept / alpha)
        up, down = up * root, down * root
    result = ModuleResult(job.name, kept, retained, error, change)
    return _unit(job, up, down, kept, alpha, delta.shape), result


def _unit(
    job: Job,
    up: torch.Tensor,
    down: torch.Tensor,
    rank: int,
    alpha: float | None,
    shape: torch.Size,
) -> AdapterModule:
    dtype = job.dtype if job.dtype in FACTOR_DTYPES else "BF16"
    if len(shape) >= 3:  # LoCon: the kernel lives in down, up is a 1x1 (or 1x1x1) conv
        up, down = up.reshape(shape[0], rank, *(1,) * (len(shape) - 2)), down.reshape(rank, *shape[1:])
    pieces = {role: stored_piece(job.name, role, t, dtype, ExtractError) for role, t in (("up", up), ("down", down))}
    return AdapterModule(
        targets=job.targets,
        component=job.component,
        kind=KINDS["lora"],
        pieces=pieces,
        alpha=float(alpha if alpha is not None else rank),
        embedding=job.type == "embedding",
        transposed=job.type == "embedding" or any(loc.transposed for loc in job.base),
        native_rows=job.native_rows,
        name=job.name,
    )


def _describe(rank: int | None, dynamic: str | None, cap: int, conv_rank: int | None) -> str:
    text = f"rank {rank}" if rank is not None else f"{dynamic} (max rank {cap})"
    return text + (f", conv rank {conv_rank}" if conv_rank is not None else "")


def _origin(
    arch: BaseArchitecture,
    layout: Layout,
    base: Path,
    tuned: Path,
    base_src: TensorSource,
    method: str,
    exact: bool,
    alpha: float | None,
    units: dict[str, AdapterModule],
) -> _Origin:
    record = {"base": base.name, "tuned": tuned.name, "method": method, "svd": "exact" if exact else "randomized"}
    metadata = {EXTRACTED_KEY: json.dumps(record, sort_keys=True)}
    if arch.base_model_version is not None:  # names the model in every layout (Chroma's names are Flux.1's)
        metadata["ss_base_model_version"] = arch.base_model_version
    if layout.name == "kohya":
        metadata.update(ss_network_module=arch.kohya_network_module, ss_network_dim="", ss_network_alpha="")
        conv_record = locon_record(units)
        if conv_record is not None:
            metadata["ss_network_args"] = json.dumps(conv_record)
    config = None
    if not arch.components:  # one whole model: its PEFT config names the base it wraps
        config = {"base_model_name_or_path": str(base)}
        architectures = (base_src.config or {}).get("architectures") or []
        if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            config["task_type"] = "CAUSAL_LM"
    return _Origin(metadata, config)
