"""`inspect`: everything a file says about itself, and what is wrong with it.

Headers first (format, architecture, ranks, alphas, shapes, metadata checks), then one pass over
the data in file order: each tensor is read once, hashed for `sshs_model_hash`, and a module is
checked as soon as its last tensor has arrived, so memory holds a few modules at most.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter import TOKEN_WHAT, Adapter, AdapterModule, compact_targets
from ..archs import Architecture
from ..archs.checkpoint import checkpoint_architecture
from ..archs.hf import detect_hf
from ..archs.locate import locate
from ..errors import InputError, LoratoolError
from ..formats import Detection, read_adapter
from ..io.safetensors_file import SafetensorsFile, tensor_from_bytes
from ..io.source import TensorSource, open_source
from ..kinds.base import ANY
from ..lazy_torch import torch
from ..ops.checks import Checker
from ..ops.findings import BasePiece, Finding, ModuleFacts, finding
from ..progress import Progress, Tally

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # what trainers that never hash write as sshs_model_hash
METADATA_SUMMARY_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_output_name",
    "ss_training_comment",
    "ss_num_epochs",
    "ss_max_train_steps",
    "ss_learning_rate",
    "ss_resolution",
    "ss_mixed_precision",
)
PEFT_SUMMARY_KEYS = (
    "peft_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "lora_bias",
    "task_type",
)


@dataclass
class ModuleReport:
    name: str
    targets: list[str]
    target: str  # targets shown compactly
    component: str | None
    kind: str
    rank: int | None
    alpha: float | None
    alpha_source: str
    scale: float | None
    dtype: str
    shape: list[int | None]  # None: a size the tensors do not fix (IA3's unscaled axis)
    parameters: int
    dw_norm: float | None = None
    numerical_rank: int | None = None
    singular_values: list[float] | None = None  # of the update, largest first (LoRA-type modules)
    block_size: int | None = None  # OFT and BOFT: the size of each rotation block (they have no rank)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class InspectReport:
    path: str
    file_size: int
    tensors: int
    format: str
    variant: str
    format_share: float
    runner_up: tuple[str, int] | None
    unexplained: list[str]
    architecture: str | None
    architecture_title: str | None
    architecture_reason: str
    modules: list[ModuleReport]
    findings: list[Finding]
    metadata: dict[str, str]
    config: dict | None
    base: str | None = None
    header_only: bool = False  # no tensor values read: no norms, value checks or hash check
    summary: dict[str, object] = field(default_factory=dict)

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "header_only": self.header_only,
            "format": self.format,
            "architecture": self.architecture,
            "summary": self.summary,
            "metadata": {"header": self.metadata, "config": self.config},
            "modules": [m.to_json() for m in self.modules],
            "findings": [f.to_json() for f in self.findings],
        }


def _other_base(adapter: Adapter, theirs: Architecture, findings: list[Finding]) -> Finding:
    """What a base of another model means for this LoRA: it does not fit (an SDXL LoRA on SD1.5), or
    it is another variant of the same family where every module fits but some have nowhere to go (a
    Wan 2.1 I2V LoRA's image attention on a T2V model)."""
    homeless = {f.module for f in findings if f.code == "unknown-key" and f.module is not None}
    misfits = [f for f in findings if f.code == "shape-mismatch"]
    siblings = getattr(adapter.arch, "family", None) == getattr(theirs, "family", "")
    if siblings and homeless and not misfits and len(homeless) < len(adapter.modules):
        return finding(
            "base-partial",
            None,
            f"this LoRA is for {adapter.arch.title} and the base is {theirs.title}: {len(homeless)} of its "
            f"{len(adapter.modules)} modules have nowhere to go there (each named below); the others apply, "
            "and merge applies them with --allow-unmatched",
        )
    return finding(
        "base-mismatch",
        None,
        f"this LoRA is for {adapter.arch.title} but the base is {theirs.title}: no UI can apply it "
        "(ComfyUI reports its keys as 'lora key not loaded'); use a LoRA trained for this model",
    )


def _reading_for_base(
    path: str | os.PathLike, base: str | os.PathLike, adapter: Adapter, detection: Detection, allow_pickle: bool
) -> tuple[Adapter, Detection]:
    """A LoRA whose names fit several families equally is read as the base's family when that is
    one of them (a Chroma LoRA on the modules it shares with Flux.1, checked against a Chroma base)."""
    try:
        with open_source(base, allow_pickle) as source:
            theirs = checkpoint_architecture(source).name
    except LoratoolError:
        return adapter, detection
    if theirs == getattr(adapter.arch, "name", None) or theirs not in adapter.arch_tied:
        return adapter, detection
    adapter.close()
    chosen, found = read_adapter(path, theirs, allow_pickle)
    chosen.arch_reason = f"{adapter.arch_reason}; the base is {chosen.arch.title}"
    return chosen, found


class BaseWeights:
    """Looks up the base weights a module updates, loading only those tensors."""

    def __init__(self, path: str | os.PathLike, adapter: Adapter, allow_pickle: bool = False) -> None:
        self.source: TensorSource = open_source(path, allow_pickle)
        if adapter.arch is None:  # no table knows the names: the base's own keys may
            adapter.place_on_base(self.source, InputError)
        self.arch = adapter.arch
        self.other_arch: Architecture | None = None  # the base is a different model than the LoRA's
        if self.arch is not None and not self.arch.lists_modules and self.source.config:
            # known by paths only: the base's config.json names the model type exactly
            self.arch = detect_hf([], config=self.source.config) or self.arch
        elif self.arch is not None:
            self.other_arch = self._other_model(self.arch)

    def _other_model(self, arch: Architecture) -> Architecture | None:
        """The base's own architecture when it is another model with other module names (SD1 and
        SD2 share every name, so only shapes, checked per module, tell those apart)."""
        try:
            found = checkpoint_architecture(self.source)
        except LoratoolError:
            return None
        if found.lists_modules and set(found.modules) != set(arch.modules):
            return found
        return None

    def pieces(self, module: AdapterModule) -> list[BasePiece] | None:
        if self.arch is None or not module.targets:
            return None
        found = locate(self.arch, module.targets, self.source, lambda k: self.source.info(k).shape)
        if found is None:
            return None
        pieces = []
        for location in found:
            weight = self.source.load(location.key)
            # A fused weight whose row blocks do not add up is compared whole: a shape mismatch.
            if location.rows is not None and location.fits_rows(weight.shape[0]):
                weight = weight[location.rows[0] : location.rows[1]]
            pieces.append(BasePiece(location, weight, self.source.info(location.key).dtype))
        return pieces

    def close(self) -> None:
        self.source.close()


def _module_report(adapter: Adapter, module: AdapterModule, facts: ModuleFacts) -> ModuleReport:
    arch = adapter.arch
    component = arch.component_label(module.component) if arch is not None else module.component
    ok = module.problem is None
    return ModuleReport(
        name=module.name,
        targets=list(module.targets),
        target=compact_targets(module.targets),
        component=component,
        kind=module.kind_label,
        rank=module.rank if ok else None,
        alpha=module.effective_alpha if ok else module.alpha,
        alpha_source=module.alpha_source,
        scale=module.scale if ok else None,
        dtype="/".join(sorted(set(module.dtypes.values()))),
        shape=[None if n == ANY else n for n in module.weight_shape] if ok else [],
        parameters=module.parameters,
        dw_norm=facts.dw_norm,
        numerical_rank=facts.numerical_rank,
        singular_values=facts.singular_values,
        block_size=module.kind.block_size(module.shapes) if ok else None,
    )


def _data_pass(
    adapter: Adapter,
    checker: Checker,
    base: BaseWeights | None,
    progress: Progress | None,
) -> tuple[dict[str, ModuleFacts], list[Finding], str]:
    """Read every tensor once in file order; check each module when its last tensor arrives."""
    (file,) = adapter.source.files  # a LoRA is always one safetensors file
    owner: dict[str, tuple[str, str]] = {}
    for module in adapter.modules.values():
        owner.update({key: (module.name, role) for role, key in module.keys.items()})
    pending: dict[str, dict[str, torch.Tensor]] = {}
    facts: dict[str, ModuleFacts] = {}
    findings: list[Finding] = []
    sha = hashlib.sha256()
    keys = list(file)
    tally = Tally(progress, len(keys), file.file_size - file.data_start)
    for key in keys:
        raw = file.read_bytes(key)
        sha.update(raw)
        if key in owner:
            name, role = owner[key]
            module = adapter.modules[name]
            tensors = pending.setdefault(name, {})
            tensors[role] = tensor_from_bytes(raw, file.info(key))
            if len(tensors) == len(module.keys):
                del pending[name]
                facts[name], module_findings = _check_module(module, tensors, checker, base)
                findings += module_findings
        tally.advance(len(raw))
    return facts, findings, sha.hexdigest()


def _check_module(
    module: AdapterModule, tensors: dict[str, torch.Tensor], checker: Checker, base: BaseWeights | None
) -> tuple[ModuleFacts, list[Finding]]:
    if base is None or module.problem is not None:
        return checker.module(module, tensors)
    pieces = base.pieces(module)
    if pieces is None:
        facts, out = checker.module(module, tensors)
        where = compact_targets(module.targets) or "this module"
        message = f"the base has no weight for {where}: a merge cannot apply it"
        return facts, [*out, finding("unknown-key", module.name, message, "error")]
    facts, out = checker.module(module, tensors, pieces)
    facts.base_parameters = sum(p.weight.numel() for p in pieces)
    return facts, out


def _hash_findings(file: SafetensorsFile, metadata: dict[str, str], data_sha: str) -> list[Finding]:
    out = []
    stored = metadata.get("sshs_model_hash")
    # LyCORIS writes "0x" + sha256 over its tensors in the network's own order, which the file does not
    # record, so that form cannot be checked; kohya's form is the sha256 of the data region.
    if stored and stored.lower() == EMPTY_SHA256 != data_sha:
        why = "the SHA-256 of empty input: the trainer wrote a placeholder, not a hash of this file"
        out.append(finding("hash-placeholder", None, f"sshs_model_hash is {why} (nothing says the file changed)"))
    elif stored and not stored.startswith("0x") and stored.lower() != data_sha:
        out.append(
            finding(
                "hash-mismatch",
                None,
                f"sshs_model_hash {stored[:12]}... does not match the data "
                f"({data_sha[:12]}...): the file changed after it was hashed",
            )
        )
    legacy = metadata.get("sshs_legacy_hash")
    if legacy:
        with open(file.path, "rb") as fh:
            fh.seek(0x100000)
            actual = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
        if legacy.lower() != actual:
            out.append(finding("hash-mismatch", None, f"sshs_legacy_hash {legacy} does not match the file ({actual})"))
    return out


def _summary(report: InspectReport, adapter: Adapter, detection: Detection, base_params: int | None) -> dict:
    modules = report.modules
    trainable = sum(m.parameters for m in modules)
    known = [m.shape for m in modules if m.shape and None not in m.shape]  # IA3 does not fix both sizes
    targeted = base_params if base_params is not None else sum(math.prod(shape) for shape in known)
    return {
        "format": {
            "name": report.format,
            "variant": report.variant,
            "keys_explained": round(report.format_share, 4),
            "runner_up": None
            if detection.runner_up is None
            else {"name": detection.runner_up[0], "keys_explained": round(detection.runner_up[1] / detection.total, 4)},
            "unexplained_keys": report.unexplained,
        },
        "architecture": {
            "name": report.architecture,
            "title": report.architecture_title,
            "reason": report.architecture_reason,
            "candidates": adapter.arch.candidates if adapter.arch is not None else None,
        },
        "modules": len(modules),
        "kinds": dict(Counter(m.kind for m in modules)),
        "components": dict(Counter(m.component or "unknown" for m in modules)),
        "ranks": _counts(m.rank for m in modules),
        "block_sizes": _counts(m.block_size for m in modules if m.block_size is not None),
        "alphas": _counts(m.alpha for m in modules),
        "scales": _counts(None if m.scale is None else round(m.scale, 6) for m in modules),
        "dtypes": dict(Counter(dt for m in adapter.modules.values() for dt in m.dtypes.values())),
        "rslora": any(m.rslora for m in adapter.modules.values()),
        "trainable_parameters": trainable,
        "targeted_base_parameters": targeted,
        "parameter_ratio": trainable / targeted if targeted else None,
        "other_tensors": {**adapter.extra_keys, **{k: TOKEN_WHAT for k in adapter.tokens}},
        "file_size": report.file_size,
        "tensors": report.tensors,
        "findings": {s: report.count(s) for s in ("error", "warning", "info")},
        "metadata": _metadata_summary(adapter),
        "base": report.base,
    }


def _counts(values: object) -> dict[str, int]:
    counter = Counter(values)
    return {
        ("none" if k is None else f"{k:g}" if isinstance(k, float) else str(k)): n
        for k, n in sorted(counter.items(), key=lambda kn: (kn[0] is None, kn[0] if kn[0] is not None else 0))
    }


def _metadata_summary(adapter: Adapter) -> dict[str, object]:
    meta = adapter.metadata
    out: dict[str, object] = {k: meta[k] for k in METADATA_SUMMARY_KEYS if k in meta}
    out.update({k: v for k, v in meta.items() if k.startswith("modelspec.")})
    others = [k for k in meta if k.startswith("ss_") and k not in out]
    if others:
        out["other_ss_keys"] = len(others)
    config = adapter.source.config if adapter.format == "peft" else None
    if config:
        out["peft_config"] = {k: config[k] for k in PEFT_SUMMARY_KEYS if config.get(k) not in (None, {}, [])}
    return out


def _header_pass(adapter: Adapter, checker: Checker) -> list[Finding]:
    """The module findings the header shows (factors that do not fit, a non-finite alpha), for a
    report that reads no tensor values."""
    out = []
    for module in adapter.modules.values():
        broken = checker.module_header(module)
        if broken is None and module.alpha is not None and not math.isfinite(module.alpha):
            broken = finding("nan-inf", module.name, "non-finite values in alpha")
        if broken is not None:
            out.append(broken)
    return out


def inspect(
    path: str | os.PathLike,
    base: str | os.PathLike | None = None,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    header_only: bool = False,
) -> InspectReport:
    """Read a LoRA file or PEFT adapter dir, check it, and describe it.

    `header_only`: no tensor values are read (only the header and the scalar tensors that hold
    settings, such as kohya's alphas): format, architecture, ranks, alphas, dtypes, metadata and
    every finding that needs no values, at a small fraction of the cost: what a library scan wants.
    """
    if header_only and base is not None:
        raise InputError("a header-only inspect reads no values, so it cannot check them against --base")
    adapter, detection = read_adapter(path, allow_pickle=allow_pickle)
    base_weights: BaseWeights | None = None
    try:
        if base is not None:
            if Path(base).resolve() == Path(path).resolve():
                raise InputError(f"{base}: the base is the adapter itself")
            if adapter.arch_tied:
                adapter, detection = _reading_for_base(path, base, adapter, detection, allow_pickle)
            base_weights = BaseWeights(base, adapter, allow_pickle)
            adapter.arch = base_weights.arch
        checker = Checker(adapter)
        findings = checker.file(detection.unexplained, have_base=base_weights is not None)
        if header_only:
            facts: dict[str, ModuleFacts] = {}
            findings += _header_pass(adapter, checker)
        else:
            facts, module_findings, data_sha = _data_pass(adapter, checker, base_weights, progress)
            findings += module_findings + _hash_findings(adapter.source.files[0], adapter.metadata, data_sha)
        if base_weights is not None and base_weights.other_arch is not None and adapter.arch is not None:
            findings.append(_other_base(adapter, base_weights.other_arch, findings))
        order = {name: i for i, name in enumerate(adapter.modules)}
        findings.sort(key=lambda f: ({"error": 0, "warning": 1, "info": 2}[f.severity], order.get(f.module or "", -1)))
        arch = adapter.arch
        report = InspectReport(
            path=str(path),
            file_size=adapter.source.nbytes,
            tensors=len(adapter.source),
            format=adapter.format,
            variant=adapter.variant,
            format_share=detection.share,
            runner_up=detection.runner_up,
            unexplained=detection.unexplained,
            architecture=None if arch is None else arch.name,
            architecture_title=None if arch is None else arch.title,
            architecture_reason=adapter.arch_reason,
            modules=[_module_report(adapter, m, facts.get(m.name, ModuleFacts())) for m in adapter.modules.values()],
            findings=findings,
            metadata=adapter.metadata,
            config=adapter.config if adapter.config is not None else adapter.source.config,
            base=None if base is None else str(base),
            header_only=header_only,
        )
        base_params = None
        if base_weights is not None:
            base_params = sum(f.base_parameters or 0 for f in facts.values())
        report.summary = _summary(report, adapter, detection, base_params)
        return report
    finally:
        adapter.close()
        if base_weights is not None:
            base_weights.close()
