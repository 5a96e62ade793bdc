"""Findings: the numeric and structural problems `inspect` reports.

Each finding has a code (documented in docs/inspect.md), a severity (error, warning, info), the
module it is about (None for the whole file) and a one-line message. Per-module checks run on the
module's tensors once they are loaded; file-level checks need only headers and metadata.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from ..adapter import Adapter, AdapterModule, table_misfit
from ..archs import NO_FIT, NO_NAMES
from ..archs.catalog import get_catalog
from ..io.safetensors_file import DTYPE_SIZES, rounded
from ..lazy_torch import torch
from .findings import BasePiece, Finding, ModuleFacts, finding
from .fuse import column_owners, reorder_rows
from .lowrank import core_singular_values, max_abs_product, numerical_rank

ARCHITECTURE_KEYS = ("ss_base_model_version", "modelspec.architecture")  # metadata that names the model
# The most values inspect forms for an update no table or base vouches for: Flux's fused linear1
# (21504 x 3072) fits, a file's fantasy of 10^10 does not.
DENSE_LIMIT = 1 << 26

FP16_MAX = 65504.0
UNDERFLOW_SHARE = 0.05  # warn when more than this share of a module's nonzero factor values are subnormal
SCALE_RANGE = (1 / 64, 8.0)
LOW_PRECISION = ("F16", "BF16", "F8_E4M3", "F8_E5M2")


def intended_alpha(value: float, dtype: str) -> float | None:
    """The shortest decimal that rounds to `value` in `dtype`: what the trainer most likely meant."""
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if rounded(candidate, dtype) == value:
            return candidate
    return None


def _tensor_facts(t: torch.Tensor) -> tuple[torch.Tensor, bool, float]:
    """(float32 copy, all finite, share of nonzero values that are subnormal in t's own dtype)."""
    x = t.float()
    if not t.is_floating_point() or x.numel() == 0:
        return x, True, 0.0
    a = x.abs()
    finite = bool(torch.isfinite(a.max()))  # max propagates NaN, and inf is its own max
    nonzero = int(torch.count_nonzero(a))
    tiny = torch.finfo(t.dtype).tiny
    subnormal = int(torch.count_nonzero(a < tiny)) - (a.numel() - nonzero) if nonzero else 0
    return x, finite, subnormal / nonzero if nonzero else 0.0


def _block_diagonal(up: torch.Tensor, row_sizes: list[int]) -> bool:
    """True when `up`'s columns split evenly into one block per row block, zero off the diagonal."""
    n = len(row_sizes)
    if up.dim() != 2 or up.shape[1] % n or sum(row_sizes) != up.shape[0]:
        return False
    r = up.shape[1] // n
    owners = column_owners(up, row_sizes)
    return owners is not None and owners == [list(range(i * r, (i + 1) * r)) for i in range(n)]


class Checker:
    """Runs every check on one adapter; module checks are fed tensors by the caller's data pass."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        factor_dtypes = Counter(dt for m in adapter.modules.values() for dt in m.dtypes.values())
        self.common_dtype = factor_dtypes.most_common(1)[0][0] if factor_dtypes else None
        self.reference_alpha = self._reference_alpha()

    # -- per module ---------------------------------------------------------------------------------
    def module_header(self, module: AdapterModule) -> Finding | None:
        """What the header alone shows is wrong with a module (factors that cannot go together):
        such a module gets no value checks."""
        if module.shape_problem:
            message = f"factors do not fit together: {module.shape_problem}"
            return finding("shape-mismatch", module.name, message)
        alpha_bad = module.alpha is not None and not math.isfinite(module.alpha)  # nan-inf says so
        if module.problem and not alpha_bad:
            return finding("broken-module", module.name, module.problem)
        return None

    def module(
        self, module: AdapterModule, tensors: dict[str, torch.Tensor], base: list[BasePiece] | None = None
    ) -> tuple[ModuleFacts, list[Finding]]:
        facts = ModuleFacts()
        out: list[Finding] = []
        name = module.name
        broken = self.module_header(module)
        if broken is not None:
            return facts, [broken]
        measured = {role: _tensor_facts(t) for role, t in tensors.items()}
        bad = [role for role, (_, finite, _) in measured.items() if not finite]
        if module.alpha is not None and not math.isfinite(module.alpha):
            bad.append("alpha")
        if bad:
            return facts, [finding("nan-inf", name, f"non-finite values in {', '.join(bad)}")]
        tensors = {role: x for role, (x, _, _) in measured.items()}  # float32 from here on
        share = max((s for _, _, s in measured.values()), default=0.0)
        if share > UNDERFLOW_SHARE:
            dtypes = "/".join(sorted(set(module.dtypes.values())))
            out.append(
                finding(
                    "underflow",
                    name,
                    f"{share:.0%} of nonzero factor values are below the smallest "
                    f"normal {dtypes} number and lose precision",
                )
            )
        if module.kind.reads_base:
            # IA3 and GLoRA change W as a function of W: with no update of their own there is no
            # norm, rank or overflow to report from the factors alone.
            return facts, out + self._fused_alpha(module, tensors)
        widened = self._widened(module, base)
        if widened is not None:
            out.append(widened)
        oversized = None if widened else self._oversized(module, base)
        if oversized is not None:
            return facts, [*out, oversized]
        scale = module.scale
        low = module.kind.low_rank(tensors)
        if low is not None:
            up, down = low
            svals = core_singular_values(up, down)
            facts.dw_norm = abs(scale) * float(svals.norm())
            facts.numerical_rank = numerical_rank(svals, (up.shape[0], down.shape[1]))
            facts.singular_values = [float(f"{abs(scale) * float(v):.6g}") for v in svals]
            rank = module.rank
            if facts.dw_norm > 0 and rank is not None and facts.numerical_rank < rank:
                out.append(
                    finding(
                        "rank-deficient",
                        name,
                        f"declared rank {rank}, numerical rank {facts.numerical_rank}: part of the rank is wasted",
                    )
                )
            dw_bound = abs(scale) * float(svals[0]) if svals.numel() else 0.0  # max |x_ij| <= spectral norm
        else:
            elements = math.prod(module.weight_shape)
            if module.kind.forms_update and base is None and elements > DENSE_LIMIT:
                shape = " x ".join(map(str, module.weight_shape))
                message = (
                    f"declares a {shape} update ({elements:,} values), more than inspect forms for a layer nothing "
                    f"vouches for ({DENSE_LIMIT:,}); pass --base to check it against the model"
                )
                return facts, [*out, finding("update-unmeasured", name, message)]
            facts.dw_norm, dw_bound = module.kind.norm_and_peak(tensors, scale)
        if facts.dw_norm == 0:
            out.append(finding("zero-module", name, "the update is identically zero: this module changes nothing"))
        out += self._fused_alpha(module, tensors)
        if base is None:
            if dw_bound > FP16_MAX:
                peak = dw_bound if low is None else max_abs_product(*low, scale=scale)
                if peak > FP16_MAX:
                    out.append(
                        finding(
                            "fp16-overflow",
                            name,
                            f"the update alone reaches {peak:.4g}, beyond fp16's "
                            f"{FP16_MAX:.0f}: an fp16 merge gives inf",
                        )
                    )
        elif widened is None:  # a widened input is checked against the zero-padded weight at merge
            out += self._against_base(module, tensors, base, dw_bound)
        return facts, out

    def _widened(self, module: AdapterModule, base: list[BasePiece] | None) -> Finding | None:
        """An input layer the family lets LoRAs widen (Flux's img_in in BFL's control LoRAs: 64
        channels + 64 of the control image), with the same output rows and more input columns."""
        arch = self.adapter.arch
        if arch is None or len(module.targets) != 1 or not arch.widens(module.targets[0]):
            return None
        shape = module.weight_shape
        spec = arch.spec(module.targets[0])
        layer = _oriented(base[0]) if base else spec.shape if spec is not None else None
        if layer is None or len(shape) != 2 or len(layer) != 2 or shape[0] != layer[0] or shape[1] <= layer[1]:
            return None
        model = arch.widened_model(module.targets[0], shape[1])
        what = f"a {model} LoRA" if model else "a control or fill LoRA"
        message = (
            f"takes {shape[1]} input channels where the model's layer has {layer[1]}: {what}; "
            "merge widens the base weight with zero columns for the new channels, as ComfyUI does"
        )
        return finding("widened-input", module.name, message)

    def _oversized(self, module: AdapterModule, base: list[BasePiece] | None) -> Finding | None:
        """A module whose declared update is larger than the layer it names (the model's full-size
        layer in the table, or the base's weight), or, with neither to vouch for it, larger than any
        update inspect forms: nothing is computed from it, so no memory follows shapes a file merely
        declares (a 3 MB LoKr can declare a 49152 x 49152 product)."""
        shape = module.weight_shape
        if any(d < 0 for d in shape):
            return None
        elements = math.prod(shape)
        if base is not None:
            available = sum(p.weight.numel() for p in base)
            if elements > available:
                where = ", ".join(f"{p.location.key}{list(_oriented(p))}" for p in base)
                return finding("shape-mismatch", module.name, f"update is {list(shape)} but the base weight is {where}")
            return None
        arch = self.adapter.arch
        specs = [arch.spec(t) for t in module.targets] if arch is not None else []
        if specs and None not in specs:
            full = sum(math.prod(s.shape) for s in specs)
            if elements > full or shape[0] > sum(s.shape[0] for s in specs):
                layer = ", ".join(f"{s.name}{list(s.shape)}" for s in specs)
                message = f"update is {list(shape)}, larger than the model's layer {layer}"
                return finding("shape-mismatch", module.name, message)
            return None
        return None

    def _against_base(
        self,
        module: AdapterModule,
        tensors: dict[str, torch.Tensor],
        base: list[BasePiece],
        dw_bound: float,
    ) -> list[Finding]:
        name = module.name
        shape = module.weight_shape
        rows = [_oriented(p)[0] for p in base]
        base_cols = {math.prod(_oriented(p)[1:]) for p in base}
        if sum(rows) != shape[0] or base_cols != {math.prod(shape[1:])}:
            swapped_ok = module.transposed and len(base) == 1 and _oriented(base[0])[:2] == (shape[1], shape[0])
            if not swapped_ok:
                where = ", ".join(f"{p.location.key}{list(_oriented(p))}" for p in base)
                return [finding("shape-mismatch", name, f"update is {list(shape)} but the base weight is {where}")]
        peak_base = max(float(p.weight.float().abs().max()) for p in base)
        if peak_base + dw_bound <= FP16_MAX:
            return []
        dense = module.scale * module.kind.delta(tensors)  # the base's size: its shape matched above
        delta = dense.reshape(dense.shape[0], -1)
        if module.transposed:
            delta = delta.T
        peak, start = 0.0, 0
        arch = self.adapter.arch
        for target, piece, n in zip(module.targets, base, rows, strict=True):
            part = delta[start : start + n]
            start += n
            part = reorder_rows(part, arch.swaps_rows(target), module.native_rows, piece.location.native_rows)
            weight = piece.weight.float()
            weight = weight.T if piece.location.transposed else weight
            peak = max(peak, float((weight.reshape(part.shape) + part).abs().max()))
        if peak <= FP16_MAX:
            return []
        fp16_base = any(p.dtype == "F16" for p in base)
        return [
            finding(
                "fp16-overflow",
                name,
                f"merged weight reaches {peak:.4g}, beyond fp16's {FP16_MAX:.0f}",
                "error" if fp16_base else "warning",
            )
        ]

    def _fused_alpha(self, module: AdapterModule, tensors: dict[str, torch.Tensor]) -> list[Finding]:
        """kohya's split_qkv bug: a block-diagonal fused up whose alpha kept the per-block value."""
        arch = self.adapter.arch
        if module.kind.name != "lora" or arch is None or module.alpha is None:
            return []
        group = arch.fused_group(module.targets)
        if group is None:
            return []
        up, down = tensors["up"].flatten(1), tensors["down"]
        sizes = group.row_sizes(down.shape[1], up.shape[0])
        if not _block_diagonal(up, sizes):
            return []
        n, total = len(sizes), up.shape[1]
        if self.reference_alpha is None or not math.isclose(module.alpha, self.reference_alpha, rel_tol=1e-6):
            return []
        return [
            finding(
                "fused-rank-alpha",
                module.name,
                f"up is block-diagonal over {n} fused parts of rank {total // n} but alpha {module.alpha:g} "
                f"was not scaled with the total rank {total}: readers apply {module.alpha:g}/{total}, "
                f"{n}x weaker than trained; alpha should be {module.alpha * n:g}",
            )
        ]

    def _reference_alpha(self) -> float | None:
        """The alpha the file's other modules (or its metadata) use, to tell a forgotten rescale."""
        try:
            return float(self.adapter.metadata["ss_network_alpha"])
        except (KeyError, ValueError):
            pass  # absent, or "Dynamic": fall back to what the other modules use
        arch = self.adapter.arch
        plain = [
            m.alpha
            for m in self.adapter.modules.values()
            if m.alpha is not None and (arch is None or arch.fused_group(m.targets) is None)
        ]
        return Counter(plain).most_common(1)[0][0] if plain else None

    # -- whole file ----------------------------------------------------------------------------------
    def file(self, unexplained: list[str], have_base: bool) -> list[Finding]:
        adapter = self.adapter
        out: list[Finding] = []
        if adapter.arch is None:
            why = adapter.arch_reason if adapter.arch_reason.startswith(NO_FIT) else NO_NAMES
            out.append(finding("unknown-architecture", None, f"{why}; modules are listed as written"))
        for orphan in adapter.orphans:
            out.append(finding("orphan-tensor", orphan.module, f"{orphan.key}: {orphan.reason}", orphan.severity))
        for key in unexplained:
            out.append(
                finding(
                    "orphan-tensor",
                    key,
                    f"{key}: no {adapter.format} module uses this tensor; loaders ignore it",
                    "warning",
                )
            )
        for module in adapter.modules.values():
            out += self._module_header_checks(module, have_base)
        out += self._metadata_checks()
        return out

    def _module_header_checks(self, module: AdapterModule, have_base: bool) -> list[Finding]:
        out: list[Finding] = []
        name = module.name
        if module.table_shape is not None:
            out.append(finding("table-mismatch", name, table_misfit(self.adapter, module)))
        if not module.targets and self.adapter.arch is not None and not have_base:
            out.append(
                finding(
                    "unknown-key",
                    name,
                    f"{self.adapter.arch.name} has no module with this name; loaders skip it ('lora key not loaded')",
                )
            )
        if (
            module.alpha is None
            and self.adapter.alpha_convention != "none"
            and module.kind.has_alpha
            and module.kind.rank(module.shapes)
        ):
            severity = "warning" if self.adapter.alpha_convention == "tensor" else "info"
            out.append(
                finding(
                    "alpha-missing",
                    name,
                    f"no alpha recorded: readers assume alpha = rank ({module.rank}), scale 1",
                    severity,
                )
            )
        if module.alpha is not None and module.alpha_dtype in LOW_PRECISION and math.isfinite(module.alpha):
            meant = intended_alpha(module.alpha, module.alpha_dtype)
            if meant is not None and meant != 0 and abs(meant - module.alpha) > 1e-6 * abs(meant):
                off = (module.alpha - meant) / meant
                out.append(
                    finding(
                        "alpha-precision",
                        name,
                        f"alpha stored as {module.alpha_dtype} reads "
                        f"{module.alpha!r}, not {meant:g}: the scale is off by "
                        f"{off:+.3%}",
                    )
                )
        if not module.problem and self.adapter.alpha_convention != "scale":  # a scale set outright is meant
            scale = module.scale
            if math.isfinite(scale) and scale != 0 and not SCALE_RANGE[0] <= abs(scale) <= SCALE_RANGE[1]:
                out.append(
                    finding(
                        "scale-unusual",
                        name,
                        f"scale {scale:.4g} (alpha {module.effective_alpha:g} / "
                        f"rank {module.rank}) is outside [1/64, 8]",
                    )
                )
        if self.common_dtype is not None:
            other = sorted({dt for dt in module.dtypes.values() if dt != self.common_dtype})
            if other:
                out.append(
                    finding(
                        "dtype-mixed",
                        name,
                        f"factors in {', '.join(other)} while the file's other factors are {self.common_dtype}",
                    )
                )
        return out

    def _metadata_checks(self) -> list[Finding]:
        meta = self.adapter.metadata
        out: list[Finding] = []
        # kohya and LyCORIS give linear layers and 1x1 convs the network dim/alpha; conv_dim and conv_alpha
        # apply to larger kernels only. A module without a rank (LoKr with two full factors) has no
        # meaningful alpha either: LyCORIS stores alpha = dim there and uses scale 1.
        linear: list[AdapterModule] = []
        conv: list[AdapterModule] = []
        if any(k in meta for k in ("ss_network_dim", "ss_network_alpha", "ss_network_args")):
            for m in self.adapter.modules.values():
                if not m.shape_problem and m.rank is not None:
                    (conv if self._uses_conv_dim(m) else linear).append(m)
        try:
            args = json.loads(meta.get("ss_network_args", "{}") or "{}")
        except json.JSONDecodeError:
            args = {}
        args = args if isinstance(args, dict) else {}
        for label, value, modules, attr in (
            ("ss_network_dim", meta.get("ss_network_dim"), linear, "rank"),
            ("ss_network_alpha", meta.get("ss_network_alpha"), linear, "effective_alpha"),
            ("conv_dim", args.get("conv_dim"), conv, "rank"),
            ("conv_alpha", args.get("conv_alpha"), conv, "effective_alpha"),
        ):
            try:
                expected = float(value)
            except (TypeError, ValueError):
                continue  # absent, or "Dynamic"
            seen = {(getattr(m, attr), m.alpha_dtype if attr == "effective_alpha" else None) for m in modules}
            wrong = [v for v, dtype in seen if not _same_number(v, expected, dtype)]
            if wrong:
                seen = sorted({v for v, _ in seen})
                found = ", ".join(f"{v:g}" for v in seen)
                out.append(
                    finding(
                        "metadata-mismatch",
                        None,
                        f"{label} says {value} but the "
                        f"{'conv' if modules is conv else 'linear'} modules "
                        f"have {attr.replace('effective_', '')} {found}",
                    )
                )
        named = self._named_architecture()
        if named is not None:
            out.append(named)
        return out

    def _named_architecture(self) -> Finding | None:
        """Metadata naming another model than the modules' (ai-toolkit once wrote
        `ss_base_model_version: sd_1.5` into its Flux LoRAs): UIs that sort by it misfile the LoRA."""
        arch = self.adapter.arch
        if arch is None:
            return None
        for key in ARCHITECTURE_KEYS:
            value = self.adapter.metadata.get(key, "")
            if not value:
                continue
            named = [a for a in get_catalog().tables if any(value.startswith(p) for p in a.hints.get(key, ()))]
            if named and arch.name not in {a.name for a in named}:
                titles = " or ".join(a.title for a in named)
                return finding(
                    "metadata-mismatch", None, f"{key} says {value!r} ({titles}), but the modules are {arch.title}'s"
                )
        return None

    def _uses_conv_dim(self, module: AdapterModule) -> bool:
        """A conv with a kernel larger than 1x1 (table shape when known, else the factors' kernel)."""
        arch = self.adapter.arch
        spec = arch.spec(module.targets[0]) if module.targets and arch is not None else None
        kernel = spec.shape[2:] if spec is not None else module.weight_shape[2:]
        return any(k > 1 for k in kernel)


def _same_number(stored: float, stated: float, dtype: str | None) -> bool:
    """Whether a tensor value is the metadata's number, allowing for rounding to the tensor's dtype."""
    if math.isclose(stored, stated, rel_tol=1e-6):
        return True
    return dtype in DTYPE_SIZES and rounded(stated, dtype) == stored


def _oriented(piece: BasePiece) -> tuple[int, ...]:
    """The piece's shape as (out, in, ...), undoing storage transposition."""
    shape = tuple(piece.weight.shape)
    return (shape[1], shape[0], *shape[2:]) if piece.location.transposed else shape
