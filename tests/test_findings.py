"""Every finding code of `loratool inspect`, planted one at a time into an otherwise clean file.

The clean files are built here: a kohya-layout SD1.5 LoRA on real SD1.5 module names, a kohya Flux
LoRA for the fused-qkv check, and PEFT adapters on tiny transformers models (with the base model
saved beside them) for the checks that need a base. Each defect test asserts the exact list of
findings, so a check that fires on the wrong module, with the wrong severity, or drags other
findings along fails. Files made by the real libraries (PEFT, LyCORIS) must come out clean.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import loratool
from loratool.ops.findings import CODES

FP16_MAX = 65504.0

# ---------------------------------------------------------------------------------------------------
# A clean kohya SD1.5 LoRA
# ---------------------------------------------------------------------------------------------------

BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
Q = BLOCK + "attn1_to_q"
K = BLOCK + "attn1_to_k"
FF = BLOCK + "ff_net_2"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"

RANK = 4
LINEAR_ALPHA = 2.0  # scale 0.5
CONV_ALPHA = 4.0  # alpha == rank: scale 1
# module -> (out features, in features, kernel); narrow widths, real SD1.5 names
SD1_MODULES: dict[str, tuple[int, int, tuple[int, ...]]] = {
    Q: (32, 32, ()),
    K: (32, 32, ()),
    FF: (32, 128, ()),
    TE: (48, 48, ()),
    CONV: (32, 32, (3, 3)),
}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SD1_META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "4"}),
    "ss_base_model_version": "sd_v1",
}


def _factors(g: torch.Generator, out: int, inp: int, kernel: tuple[int, ...], rank: int = RANK):
    down = torch.randn(rank, inp, *kernel, generator=g) * 0.05
    up = torch.randn(out, rank, *([1, 1] if kernel else []), generator=g) * 0.05
    return down.half(), up.half()


def sd1_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """fp16 factors (std 0.05, full rank), fp16 0-d alphas with exactly representable values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, (out, inp, kernel) in SD1_MODULES.items():
        down, up = _factors(g, out, inp, kernel)
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(CONV_ALPHA if kernel else LINEAR_ALPHA, dtype=torch.float16)
    return sd


def data_region_sha256(path: Path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n :]).hexdigest()


def load_metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])["__metadata__"]


def save_lora(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str], with_hash: bool = True) -> Path:
    """Save, then store the data region's sha256 as sshs_model_hash (the data bytes do not move)."""
    meta = dict(metadata)
    save_file(sd, str(path), metadata=meta)
    if with_hash:
        meta["sshs_model_hash"] = data_region_sha256(path)
        save_file(sd, str(path), metadata=meta)
    return path


def make_sd1(
    tmp_path: Path,
    mutate: Callable[[dict[str, torch.Tensor]], None] | None = None,
    meta: dict[str, str] | None = None,
    name: str = "lora.safetensors",
) -> Path:
    sd = sd1_lora()
    if mutate is not None:
        mutate(sd)
    return save_lora(tmp_path / name, sd, {**SD1_META, **(meta or {})})


Triple = tuple[str, str, "str | None"]


def ordered(triples: list[Triple]) -> list[Triple]:
    """(code, severity, module) in a fixed order; module None (file level) sorts first."""
    return sorted(triples, key=lambda t: (t[0], t[1], t[2] or ""))


def triples(report) -> list[Triple]:
    """Every finding as (code, severity, module)."""
    return ordered([(f.code, f.severity, f.module) for f in report.findings])


def problems(report) -> list[Triple]:
    """Warnings and errors only."""
    return ordered([(f.code, f.severity, f.module) for f in report.findings if f.severity in ("error", "warning")])


def the_finding(report, code: str):
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, report.findings
    return found[0]


def module_report(report, name: str):
    return next(m for m in report.modules if m.name == name)


# ---------------------------------------------------------------------------------------------------
# The code table and the clean file
# ---------------------------------------------------------------------------------------------------


def test_codes_and_default_severities() -> None:
    assert CODES == {
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


def test_clean_sd1_file_has_no_findings(tmp_path: Path) -> None:
    path = make_sd1(tmp_path)
    assert load_metadata(path)["sshs_model_hash"] == data_region_sha256(path)

    report = loratool.inspect(path)
    assert report.findings == []
    assert report.format == "kohya"
    assert report.architecture == "sd1"
    assert sorted(m.name for m in report.modules) == sorted(SD1_MODULES)
    sd = sd1_lora()
    for name, (out, inp, kernel) in SD1_MODULES.items():
        m = module_report(report, name)
        alpha = CONV_ALPHA if kernel else LINEAR_ALPHA
        assert (m.kind, m.rank, m.alpha, m.dtype) == ("lora", RANK, alpha, "F16")
        assert m.scale == pytest.approx(alpha / RANK)
        assert m.shape == [out, inp, *kernel]
        assert m.numerical_rank == RANK
        up = sd[f"{name}.lora_up.weight"].double().flatten(1)
        down = sd[f"{name}.lora_down.weight"].double().flatten(1)
        assert m.dw_norm == pytest.approx(float((alpha / RANK * up @ down).norm()), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Per-module numeric checks
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [(f"{Q}.lora_down.weight", float("nan")), (f"{Q}.lora_up.weight", float("inf"))],
    ids=["nan-in-down", "inf-in-up"],
)
def test_nan_inf(tmp_path: Path, key: str, value: float) -> None:
    def plant(sd):
        sd[key][1, 2] = value

    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert triples(report) == [("nan-inf", "error", Q)]


def test_nan_inf_alpha(tmp_path: Path) -> None:
    def plant(sd):
        sd[f"{Q}.alpha"] = torch.tensor(float("inf"), dtype=torch.float16)

    report = loratool.inspect(make_sd1(tmp_path, plant))
    # Implied by the defect: the module's alpha (inf) is not the header's ss_network_alpha (2).
    assert triples(report) == [("metadata-mismatch", "warning", None), ("nan-inf", "error", Q)]
    assert "alpha" in the_finding(report, "nan-inf").message


@pytest.mark.parametrize(
    ("why", "plant"),
    [
        ("floating point", lambda sd: sd.update({f"{Q}.lora_up.weight": sd[f"{Q}.lora_up.weight"].to(torch.int32)})),
        (
            "is empty",
            lambda sd: sd.update(
                {
                    f"{Q}.lora_up.weight": sd[f"{Q}.lora_up.weight"][:, :0].contiguous(),
                    f"{Q}.lora_down.weight": sd[f"{Q}.lora_down.weight"][:0].contiguous(),
                }
            ),
        ),
    ],
)
def test_broken_module(tmp_path: Path, why, plant) -> None:
    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert ("broken-module", "error", Q) in triples(report)
    assert why in the_finding(report, "broken-module").message


def test_fp16_overflow_of_the_update_alone(tmp_path: Path) -> None:
    clean = sd1_lora()
    up, down = clean[f"{Q}.lora_up.weight"].float(), clean[f"{Q}.lora_down.weight"].float()
    peak = float((0.5 * up @ down).abs().max())
    c = math.sqrt(2 * FP16_MAX / peak)  # update peaks at ~2x fp16's max; the factors stay well inside fp16

    def plant(sd):
        sd[f"{Q}.lora_up.weight"] = (up * c).half()
        sd[f"{Q}.lora_down.weight"] = (down * c).half()

    path = make_sd1(tmp_path, plant)
    sd = load_file(str(path))
    big_up, big_down = sd[f"{Q}.lora_up.weight"].float(), sd[f"{Q}.lora_down.weight"].float()
    assert max(float(big_up.abs().max()), float(big_down.abs().max())) < 2000
    expected_peak = float((0.5 * big_up.double() @ big_down.double()).abs().max())
    assert expected_peak > FP16_MAX

    report = loratool.inspect(path)
    assert triples(report) == [("fp16-overflow", "warning", Q)]
    assert f"{expected_peak:.4g}" in the_finding(report, "fp16-overflow").message


def test_no_fp16_overflow_when_only_the_bound_is_large(tmp_path: Path) -> None:
    """Row norm x column norm exceeds fp16's range, but the product itself stays small."""

    def plant(sd):
        sd[f"{Q}.lora_up.weight"][0, 0] = 400.0  # pairs with down row 0 (small values)
        sd[f"{Q}.lora_down.weight"][1, 0] = 400.0  # pairs with up column 1 (small values)

    path = make_sd1(tmp_path, plant)
    sd = load_file(str(path))
    up, down = sd[f"{Q}.lora_up.weight"].double(), sd[f"{Q}.lora_down.weight"].double()
    assert 0.5 * float(up.norm(dim=1).max() * down.norm(dim=0).max()) > FP16_MAX
    assert float((0.5 * up @ down).abs().max()) < 1000
    report = loratool.inspect(path)
    assert triples(report) == []


def test_underflow(tmp_path: Path) -> None:
    def plant(sd):
        g = torch.Generator().manual_seed(5)
        sd[f"{K}.lora_down.weight"] = (torch.randn(RANK, 32, generator=g) * 2e-6).half()

    path = make_sd1(tmp_path, plant)
    down = load_file(str(path))[f"{K}.lora_down.weight"]
    nonzero = down[down != 0]
    assert float((nonzero.abs() < torch.finfo(torch.float16).tiny).float().mean()) > 0.9
    report = loratool.inspect(path)
    assert triples(report) == [("underflow", "warning", K)]
    assert "F16" in the_finding(report, "underflow").message


def test_few_subnormals_are_not_underflow(tmp_path: Path) -> None:
    def plant(sd):
        sd[f"{K}.lora_down.weight"][0, :1] = 1e-6  # 1 of 128 values: below the 5% threshold

    assert triples(loratool.inspect(make_sd1(tmp_path, plant))) == []


def test_alpha_missing_where_alpha_equals_rank(tmp_path: Path) -> None:
    # The conv module's alpha is its rank, so dropping it changes no scale and no metadata agrees less.
    report = loratool.inspect(make_sd1(tmp_path, lambda sd: sd.pop(f"{CONV}.alpha")))
    assert triples(report) == [("alpha-missing", "warning", CONV)]
    m = module_report(report, CONV)
    assert (m.alpha, m.scale, m.alpha_source) == (RANK, 1.0, "default")


def test_alpha_missing_on_a_scaled_module(tmp_path: Path) -> None:
    report = loratool.inspect(make_sd1(tmp_path, lambda sd: sd.pop(f"{TE}.alpha")))
    # Implied by the defect: without its alpha the module's effective alpha is its rank (4), which
    # contradicts ss_network_alpha = 2 in the header.
    assert triples(report) == [("alpha-missing", "warning", TE), ("metadata-mismatch", "warning", None)]
    assert "ss_network_alpha" in the_finding(report, "metadata-mismatch").message
    m = module_report(report, TE)
    assert (m.alpha, m.scale) == (RANK, 1.0)


DIFFUSERS_MODULES = (
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
)


@pytest.mark.parametrize("with_config", [False, True])
def test_alpha_missing_is_info_where_a_config_is_the_norm(tmp_path: Path, with_config: bool) -> None:
    """diffusers files keep alphas in `lora_adapter_metadata`; without it alpha = rank is only worth a note."""
    g = torch.Generator().manual_seed(2)
    sd: dict[str, torch.Tensor] = {}
    for name in DIFFUSERS_MODULES:
        down, up = _factors(g, 32, 32, ())
        sd |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": RANK})} if with_config else {}
    report = loratool.inspect(save_lora(tmp_path / "pytorch_lora_weights.safetensors", sd, meta))
    assert report.format == "diffusers"
    assert {m.scale for m in report.modules} == {1.0}
    assert triples(report) == (
        [] if with_config else ordered([("alpha-missing", "info", n) for n in DIFFUSERS_MODULES])
    )


@pytest.mark.parametrize(("intended", "reads"), [(0.1, 0.10009765625), (0.3, 0.30078125)])
def test_alpha_precision(tmp_path: Path, intended: float, reads: float) -> None:
    # A trainer run with conv_alpha=0.1 (or 0.3) and a bf16 save: the header says what the trainer was
    # told, the tensor reads 0.10009765625 (0.30078125). The header is right, so it is no metadata-mismatch:
    # the rounding is exactly what alpha-precision reports.
    def plant(sd):
        sd[f"{CONV}.alpha"] = torch.tensor(intended, dtype=torch.bfloat16)

    meta = {"ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": str(intended)})}
    report = loratool.inspect(make_sd1(tmp_path, plant, meta))
    assert module_report(report, CONV).alpha == reads
    message = the_finding(report, "alpha-precision").message
    assert repr(reads) in message and "BF16" in message
    assert triples(report) == [("alpha-precision", "warning", CONV)]


def test_exact_low_precision_alpha_is_not_flagged(tmp_path: Path) -> None:
    def plant(sd):
        sd[f"{CONV}.alpha"] = torch.tensor(CONV_ALPHA, dtype=torch.bfloat16)

    assert triples(loratool.inspect(make_sd1(tmp_path, plant))) == []


@pytest.mark.parametrize(("alpha", "unusual"), [(1000.0, True), (0.03125, True), (32.0, False), (0.0625, False)])
def test_scale_unusual(tmp_path: Path, alpha: float, unusual: bool) -> None:
    """Scales outside [1/64, 8] are flagged; the bounds themselves (alpha 32 and 1/16 at rank 4) are not."""

    def plant(sd):
        sd[f"{CONV}.alpha"] = torch.tensor(alpha, dtype=torch.float16)

    # The trainer's settings say the same alpha, so only the scale itself is unusual.
    meta = {"ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": str(alpha)})}
    report = loratool.inspect(make_sd1(tmp_path, plant, meta))
    assert triples(report) == ([("scale-unusual", "warning", CONV)] if unusual else [])
    assert module_report(report, CONV).scale == alpha / RANK


def _duplicate_up_column(sd):
    sd[f"{FF}.lora_up.weight"][:, 1] = sd[f"{FF}.lora_up.weight"][:, 0]


def _zero_rank_component(sd):
    sd[f"{FF}.lora_down.weight"][2] = 0


@pytest.mark.parametrize("plant", [_duplicate_up_column, _zero_rank_component], ids=["dup-column", "zero-component"])
def test_rank_deficient(tmp_path: Path, plant) -> None:
    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert triples(report) == [("rank-deficient", "warning", FF)]
    assert "numerical rank 3" in the_finding(report, "rank-deficient").message
    assert module_report(report, FF).numerical_rank == 3
    assert module_report(report, FF).rank == RANK


def test_conv_rank_deficient(tmp_path: Path) -> None:
    def plant(sd):
        sd[f"{CONV}.lora_down.weight"][3] = sd[f"{CONV}.lora_down.weight"][0]

    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert triples(report) == [("rank-deficient", "warning", CONV)]


def test_zero_module(tmp_path: Path) -> None:
    def plant(sd):
        sd[f"{TE}.lora_up.weight"].zero_()

    report = loratool.inspect(make_sd1(tmp_path, plant))
    # No rank-deficient on top: a zero update has no rank to waste.
    assert triples(report) == [("zero-module", "warning", TE)]
    assert module_report(report, TE).dw_norm == 0


# ---------------------------------------------------------------------------------------------------
# Flux: kohya split_qkv with an alpha that was not rescaled
# ---------------------------------------------------------------------------------------------------

QKV = "lora_unet_double_blocks_0_img_attn_qkv"
HIDDEN = 32
FLUX_PLAIN = {
    "lora_unet_double_blocks_0_img_attn_proj": (HIDDEN, HIDDEN),
    "lora_unet_double_blocks_0_img_mlp_0": (4 * HIDDEN, HIDDEN),
    "lora_unet_double_blocks_0_img_mlp_2": (HIDDEN, 4 * HIDDEN),
    "lora_unet_double_blocks_0_txt_attn_proj": (HIDDEN, HIDDEN),
}
FLUX_META = {
    "ss_network_module": "networks.lora_flux",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "flux1",
}


def flux_lora(split_qkv: bool, qkv_alpha: float = LINEAR_ALPHA) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    for name, (out, inp) in FLUX_PLAIN.items():
        down, up = _factors(g, out, inp, ())
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        sd[f"{name}.alpha"] = torch.tensor(LINEAR_ALPHA, dtype=torch.float16)
    if split_qkv:  # q, k, v each of rank r: downs stacked (3r x hidden), up block-diagonal (3 hidden x 3r)
        parts = [_factors(g, HIDDEN, HIDDEN, ()) for _ in range(3)]
        down = torch.cat([d for d, _ in parts])
        up = torch.block_diag(*(u.float() for _, u in parts)).half()
    else:  # one LoRA over the fused weight: rank r, up 3 hidden x r
        down, up = _factors(g, 3 * HIDDEN, HIDDEN, ())
    sd |= {f"{QKV}.lora_down.weight": down, f"{QKV}.lora_up.weight": up}
    sd[f"{QKV}.alpha"] = torch.tensor(qkv_alpha, dtype=torch.float16)
    return sd


def test_clean_flux_file_has_no_findings(tmp_path: Path) -> None:
    path = save_lora(tmp_path / "flux.safetensors", flux_lora(split_qkv=False), FLUX_META)
    report = loratool.inspect(path)
    assert report.architecture == "flux1"
    assert triples(report) == []
    qkv = module_report(report, QKV)
    assert len(qkv.targets) == 3 and qkv.shape == [3 * HIDDEN, HIDDEN]


FLUX_META_VARIANTS = {
    "alpha-in-header": {k: v for k, v in FLUX_META.items() if k != "ss_network_dim"},
    "dim-and-alpha-in-header": FLUX_META,
    "dynamic-alpha-in-header": {**FLUX_META, "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"},
    # The other modules' alpha is the reference when no header says it (converted or stripped files).
    "no-header": {},
}


@pytest.mark.parametrize("variant", list(FLUX_META_VARIANTS))
def test_fused_rank_alpha(tmp_path: Path, variant: str) -> None:
    path = save_lora(tmp_path / "flux.safetensors", flux_lora(split_qkv=True), FLUX_META_VARIANTS[variant])
    report = loratool.inspect(path)
    assert report.architecture == "flux1"
    expected = [("fused-rank-alpha", "error", QKV)]
    if variant == "dim-and-alpha-in-header":
        # Implied by the layout: split_qkv stores q, k, v as one module of rank 3r, while the header's
        # ss_network_dim is the per-part rank r.
        expected.append(("metadata-mismatch", "warning", None))
    assert triples(report) == ordered(expected)
    message = the_finding(report, "fused-rank-alpha").message
    assert "rank 12" in message and "alpha should be 6" in message
    qkv = module_report(report, QKV)
    assert (qkv.rank, qkv.alpha) == (3 * RANK, LINEAR_ALPHA)


def test_fused_rank_alpha_needs_a_block_diagonal_up(tmp_path: Path) -> None:
    """A rank-3r LoRA trained on the fused qkv weight as a whole is not kohya's split_qkv layout."""
    sd = flux_lora(split_qkv=True)
    g = torch.Generator().manual_seed(8)
    sd[f"{QKV}.lora_up.weight"] = (torch.randn(3 * HIDDEN, 3 * RANK, generator=g) * 0.05).half()
    meta = {k: v for k, v in FLUX_META.items() if k != "ss_network_dim"}  # the ranks differ on purpose
    report = loratool.inspect(save_lora(tmp_path / "flux.safetensors", sd, meta))
    assert triples(report) == []


# ---------------------------------------------------------------------------------------------------
# Structure: names, orphans, shapes, dtypes
# ---------------------------------------------------------------------------------------------------

ATTN3 = BLOCK + "attn3_to_q"  # SD1.5 has attn1 and attn2 only


def test_unknown_key_without_base(tmp_path: Path) -> None:
    def plant(sd):
        down, up = _factors(torch.Generator().manual_seed(9), 32, 32, ())
        sd |= {f"{ATTN3}.lora_down.weight": down, f"{ATTN3}.lora_up.weight": up}
        sd[f"{ATTN3}.alpha"] = torch.tensor(LINEAR_ALPHA, dtype=torch.float16)

    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert report.architecture == "sd1"
    assert triples(report) == [("unknown-key", "warning", ATTN3)]
    assert module_report(report, ATTN3).targets == []


def test_orphan_down_without_up(tmp_path: Path) -> None:
    report = loratool.inspect(make_sd1(tmp_path, lambda sd: sd.pop(f"{K}.lora_up.weight")))
    # One finding per tensor of the incomplete module: its down and its alpha.
    assert triples(report) == [("orphan-tensor", "error", K)] * 2
    assert K not in {m.name for m in report.modules}


def test_orphan_alpha_without_factors(tmp_path: Path) -> None:
    name = BLOCK + "attn2_to_q"

    def plant(sd):
        sd[f"{name}.alpha"] = torch.tensor(LINEAR_ALPHA, dtype=torch.float16)

    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert triples(report) == [("orphan-tensor", "warning", name)]


def test_orphan_unexplained_key(tmp_path: Path) -> None:
    key = "training_step_counter"

    def plant(sd):
        sd[key] = torch.tensor([1234], dtype=torch.int64)

    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert report.format == "kohya"
    assert triples(report) == [("orphan-tensor", "warning", key)]


def test_orphan_tensors_of_two_kinds(tmp_path: Path) -> None:
    def plant(sd):
        sd[f"{K}.hada_w1_a"] = torch.zeros(32, RANK, dtype=torch.float16)

    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert set(triples(report)) == {("orphan-tensor", "error", K)}


def test_shape_mismatch_between_factors(tmp_path: Path) -> None:
    def plant(sd):
        sd[f"{Q}.lora_up.weight"] = sd[f"{Q}.lora_up.weight"][:, :3].contiguous()  # 3 columns, down has 4 rows

    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert triples(report) == [("shape-mismatch", "error", Q)]


def test_dtype_mixed(tmp_path: Path) -> None:
    def plant(sd):
        for role in ("lora_down", "lora_up"):
            sd[f"{FF}.{role}.weight"] = sd[f"{FF}.{role}.weight"].float()

    report = loratool.inspect(make_sd1(tmp_path, plant))
    assert triples(report) == [("dtype-mixed", "warning", FF)]
    assert "F32" in the_finding(report, "dtype-mixed").message


# ---------------------------------------------------------------------------------------------------
# File level: metadata, hashes, architecture
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "label"),
    [
        ({"ss_network_dim": "8"}, "ss_network_dim"),
        ({"ss_network_alpha": "1.0"}, "ss_network_alpha"),
        ({"ss_network_alpha": "2.1"}, "ss_network_alpha"),
        ({"ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"})}, "conv_dim"),
        ({"ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"})}, "conv_alpha"),
    ],
)
def test_metadata_mismatch(tmp_path: Path, meta: dict[str, str], label: str) -> None:
    report = loratool.inspect(make_sd1(tmp_path, meta=meta))
    assert triples(report) == [("metadata-mismatch", "warning", None)]
    assert the_finding(report, "metadata-mismatch").message.startswith(label + " says")


def test_one_by_one_convs_follow_the_linear_metadata(tmp_path: Path) -> None:
    """kohya's networks/lora.py trains 1x1 convs (SD1's proj_in/proj_out, conv_shortcut) with
    network_dim/network_alpha, not conv_dim/conv_alpha: such a module agrees with the header."""
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"

    def add_proj_in(sd):
        down, up = _factors(torch.Generator().manual_seed(12), 32, 32, (1, 1))
        sd |= {f"{proj_in}.lora_down.weight": down, f"{proj_in}.lora_up.weight": up}
        sd[f"{proj_in}.alpha"] = torch.tensor(LINEAR_ALPHA, dtype=torch.float16)  # network_alpha, not conv_alpha

    report = loratool.inspect(make_sd1(tmp_path, add_proj_in))
    assert module_report(report, proj_in).shape == [32, 32, 1, 1]
    assert triples(report) == []


def test_dynamic_metadata_is_not_a_mismatch(tmp_path: Path) -> None:
    report = loratool.inspect(make_sd1(tmp_path, meta={"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}))
    assert triples(report) == []


def test_hash_mismatch_wrong_hash(tmp_path: Path) -> None:
    sd = sd1_lora()
    path = save_lora(tmp_path / "lora.safetensors", sd, {**SD1_META, "sshs_model_hash": "0" * 64}, with_hash=False)
    report = loratool.inspect(path)
    assert triples(report) == [("hash-mismatch", "warning", None)]


def test_hash_mismatch_data_changed_after_hashing(tmp_path: Path) -> None:
    sd = sd1_lora()
    path = save_lora(tmp_path / "lora.safetensors", sd, SD1_META)
    stored = load_metadata(path)["sshs_model_hash"]
    sd[f"{Q}.lora_down.weight"][0, 0] += 0.01
    save_lora(path, sd, {**SD1_META, "sshs_model_hash": stored}, with_hash=False)
    report = loratool.inspect(path)
    assert triples(report) == [("hash-mismatch", "warning", None)]


def test_hash_of_empty_input_is_a_placeholder_not_a_changed_file(tmp_path: Path) -> None:
    """Some trainers write sha256(b"") as sshs_model_hash; saying the file changed would be wrong."""
    meta = {**SD1_META, "sshs_model_hash": hashlib.sha256(b"").hexdigest()}
    path = save_lora(tmp_path / "lora.safetensors", sd1_lora(), meta, with_hash=False)
    report = loratool.inspect(path)
    assert triples(report) == [("hash-placeholder", "info", None)]
    assert "placeholder" in the_finding(report, "hash-placeholder").message


@pytest.mark.parametrize(
    ("key", "value", "flagged"),
    [
        ("ss_base_model_version", "flux1", True),
        ("ss_base_model_version", "sdxl_base_v1-0", True),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora", True),
        ("ss_base_model_version", "sd_v1", False),
        ("ss_base_model_version", "sd_1.5", False),  # ai-toolkit's spelling of SD1.5
        ("ss_base_model_version", "some-model-we-do-not-know", False),  # names nothing we could compare
    ],
)
def test_metadata_naming_another_model_is_a_mismatch(tmp_path: Path, key: str, value: str, flagged: bool) -> None:
    report = loratool.inspect(make_sd1(tmp_path, meta={key: value}))
    if flagged:
        assert triples(report) == [("metadata-mismatch", "warning", None)]
        message = the_finding(report, "metadata-mismatch").message
        assert message.startswith(f"{key} says {value!r}") and "Stable Diffusion 1.x" in message
    else:
        assert triples(report) == []


def test_ai_toolkit_flux_file_that_says_sd15(tmp_path: Path) -> None:
    """An ai-toolkit Flux LoRA (`transformer.` + diffusers names, no alphas) whose metadata says
    `ss_base_model_version: sd_1.5` and whose hash is a placeholder: both said plainly."""
    tensors = load_file(str(FIXTURES / "flux_diffusers.safetensors"))
    meta = {"format": "pt", "ss_base_model_version": "sd_1.5", "sshs_model_hash": hashlib.sha256(b"").hexdigest()}
    path = save_lora(tmp_path / "aitk.safetensors", tensors, meta, with_hash=False)
    report = loratool.inspect(path)
    assert report.architecture == "flux1"
    codes = {(f.code, f.severity) for f in report.findings}
    assert {("metadata-mismatch", "warning"), ("hash-placeholder", "info")} <= codes
    assert "hash-mismatch" not in {c for c, _ in codes}
    message = the_finding(report, "metadata-mismatch").message
    assert "'sd_1.5' (Stable Diffusion 1.x)" in message and "Flux.1" in message


def test_hash_mismatch_legacy_hash(tmp_path: Path) -> None:
    path = make_sd1(tmp_path)
    size = path.stat().st_size
    assert size < 0x100000  # the legacy hash window is past the end: sha256 of no bytes
    good = hashlib.sha256(b"").hexdigest()[:8]
    assert triples(loratool.inspect(make_sd1(tmp_path, meta={"sshs_legacy_hash": good}, name="a.safetensors"))) == []
    report = loratool.inspect(make_sd1(tmp_path, meta={"sshs_legacy_hash": "0badc0de"}, name="b.safetensors"))
    assert triples(report) == [("hash-mismatch", "warning", None)]


def test_legacy_hash_of_a_file_past_one_mebibyte(tmp_path: Path) -> None:
    """A1111's legacy hash: sha256 of the 0x10000 file bytes at 0x100000, first 8 hex digits."""
    fc1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    rank = 160  # makes the file ~1.2 MiB

    def add_big_module(sd):
        down, up = _factors(torch.Generator().manual_seed(13), 3072, 768, (), rank=rank)
        sd |= {f"{fc1}.lora_down.weight": down, f"{fc1}.lora_up.weight": up}
        sd[f"{fc1}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)

    meta = {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic", "sshs_legacy_hash": "00000000"}
    path = make_sd1(tmp_path, add_big_module, meta)
    raw = path.read_bytes()
    assert len(raw) > 0x110000
    legacy = hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    sd = load_file(str(path))
    # Same length as the placeholder, so no byte moves and the window's content stays what was hashed.
    good = save_lora(tmp_path / "good.safetensors", sd, {**load_metadata(path), "sshs_legacy_hash": legacy}, False)
    assert hashlib.sha256(good.read_bytes()[0x100000:0x110000]).hexdigest()[:8] == legacy
    assert triples(loratool.inspect(good)) == []
    report = loratool.inspect(path)  # still the placeholder
    assert triples(report) == [("hash-mismatch", "warning", None)]
    assert "sshs_legacy_hash" in the_finding(report, "hash-mismatch").message


def test_unknown_architecture(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    sd: dict[str, torch.Tensor] = {}
    for name in ("lora_unet_my_custom_block_proj", "lora_unet_my_custom_block_out"):
        down, up = _factors(g, 16, 16, ())
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        sd[f"{name}.alpha"] = torch.tensor(LINEAR_ALPHA, dtype=torch.float16)
    report = loratool.inspect(save_lora(tmp_path / "custom.safetensors", sd, {}))
    assert report.architecture is None
    # No unknown-key either: without an architecture there is nothing to be unknown to.
    assert triples(report) == [("unknown-architecture", "info", None)]


# ---------------------------------------------------------------------------------------------------
# --strict through the installed command
# ---------------------------------------------------------------------------------------------------


def loratool_command() -> list[str]:
    exe = shutil.which("loratool", path=str(Path(sys.executable).parent)) or shutil.which("loratool")
    return [exe] if exe else [sys.executable, "-m", "loratool.cli"]


def run_many(runs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run several CLI invocations at once: each pays the interpreter and torch start-up."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = loratool_command()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(subprocess.run, [*cmd, *args], capture_output=True, text=True, timeout=300, env=env)
            for name, args in runs.items()
        }
        return {name: f.result() for name, f in futures.items()}


def test_strict_exit_codes(tmp_path: Path) -> None:
    def nan(sd):
        sd[f"{Q}.lora_down.weight"][0, 0] = float("nan")

    def mixed(sd):
        sd[f"{FF}.lora_up.weight"] = sd[f"{FF}.lora_up.weight"].float()

    error_file = make_sd1(tmp_path, nan, name="error.safetensors")
    warning_file = make_sd1(tmp_path, mixed, name="warning.safetensors")
    assert {f.severity for f in loratool.inspect(warning_file).findings} == {"warning"}
    clean_file = make_sd1(tmp_path, name="clean.safetensors")
    results = run_many(
        {
            "error strict": ["inspect", str(error_file), "--strict"],
            "error": ["inspect", str(error_file)],
            "warning strict": ["inspect", str(warning_file), "--strict"],
            "clean strict": ["inspect", str(clean_file), "--strict", "--json"],
        }
    )
    for name, result in results.items():
        assert "Traceback" not in result.stdout + result.stderr, name
    strict = results["error strict"]
    assert strict.returncode == 1, strict.stderr
    assert "nan-inf" in strict.stdout
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:")
    assert results["error"].returncode == 0, results["error"].stderr
    assert "nan-inf" in results["error"].stdout
    assert results["warning strict"].returncode == 0, results["warning strict"].stderr
    assert "dtype-mixed" in results["warning strict"].stdout
    assert results["clean strict"].returncode == 0, results["clean strict"].stderr
    assert json.loads(results["clean strict"].stdout)["findings"] == []


# ---------------------------------------------------------------------------------------------------
# PEFT adapters on tiny transformers models, with their bases
# ---------------------------------------------------------------------------------------------------

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
WRAP = "base_model.model."


def _tiny_llama():
    from tiny_models import llama

    return llama()


def _peft_dir(model, directory: Path, **config):
    """Save `model` as the base, wrap it with a PEFT LoRA, save the adapter: (base dir, base weights, PEFT model)."""
    from peft import LoraConfig, get_peft_model

    base_dir = directory / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(**config))
    peft_model.save_pretrained(directory / "adapter")
    return base_dir, base_sd, peft_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> SimpleNamespace:
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base_dir, base_sd, peft_model = _peft_dir(
        _tiny_llama(), directory, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False
    )
    merged = peft_model.merge_and_unload().state_dict()
    deltas = {k[: -len(".weight")]: merged[k] - base_sd[k] for k in base_sd if k.endswith(".weight")}
    return SimpleNamespace(base=base_dir, adapter=directory / "adapter", base_sd=base_sd, deltas=deltas)


def _edited_copy(src: Path, dst: Path, weights: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of a saved model or adapter dir whose weights file went through `edit`."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / weights))
    edit(sd)
    save_file(sd, str(dst / weights), metadata={"format": "pt"})
    return dst


def _edited_adapter(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    return _edited_copy(src, dst, "adapter_model.safetensors", edit)


def _edited_base(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    return _edited_copy(src, dst, "model.safetensors", edit)


def _check_clean_peft(report, base_sd: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> None:
    assert problems(report) == []
    assert report.format == "peft"
    trainable = targeted = 0
    for m in report.modules:
        weight = base_sd[m.name + ".weight"]
        assert m.shape == list(weight.shape), m.name
        assert m.dw_norm == pytest.approx(float(deltas[m.name].double().norm()), rel=1e-4), m.name
        trainable += m.parameters
        targeted += weight.numel()
    assert report.summary["targeted_base_parameters"] == targeted
    assert report.summary["parameter_ratio"] == pytest.approx(trainable / targeted)


def test_peft_llama_with_base_is_clean(llama) -> None:
    report = loratool.inspect(llama.adapter, base=llama.base)
    assert report.architecture == "llama"
    assert len(report.modules) == 2 * len(LLAMA_TARGETS)
    assert {(m.rank, m.alpha, m.scale) for m in report.modules} == {(8, 16.0, 2.0)}
    _check_clean_peft(report, llama.base_sd, llama.deltas)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
def test_peft_embedding_and_lm_head_with_base_are_clean(tmp_path: Path) -> None:
    """lora_embedding_A/B update the embedding transposed; PEFT also saves those base layers."""
    torch.manual_seed(0)
    base_dir, base_sd, peft_model = _peft_dir(
        _tiny_llama(),
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj", "lm_head"],
        init_lora_weights=False,
    )
    merged = peft_model.merge_and_unload().state_dict()
    deltas = {k[: -len(".weight")]: merged[k] - base_sd[k] for k in base_sd if k.endswith(".weight")}
    report = loratool.inspect(tmp_path / "adapter", base=base_dir)
    assert {m.name for m in report.modules} >= {"model.embed_tokens", "lm_head"}
    _check_clean_peft(report, base_sd, deltas)


def test_peft_modules_to_save_are_explained(tmp_path: Path) -> None:
    """PEFT matches modules_to_save as a plain name suffix: "norm" also saves every *_layernorm."""
    torch.manual_seed(0)
    _peft_dir(
        _tiny_llama(),
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        modules_to_save=["norm"],
        init_lora_weights=False,
    )
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert f"{WRAP}model.layers.0.input_layernorm.weight" in saved  # what PEFT itself saved
    report = loratool.inspect(tmp_path / "adapter")
    assert problems(report) == []


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> SimpleNamespace:
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    base_dir, base_sd, peft_model = _peft_dir(
        GPT2LMHeadModel(config),
        directory,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    merged = peft_model.merge_and_unload().state_dict()
    deltas = {k[: -len(".weight")]: merged[k] - base_sd[k] for k in base_sd if k.endswith(".weight")}
    return SimpleNamespace(base=base_dir, adapter=directory / "adapter", base_sd=base_sd, deltas=deltas)


def test_peft_gpt2_fan_in_fan_out_with_base_is_clean(gpt2) -> None:
    report = loratool.inspect(gpt2.adapter, base=gpt2.base)
    assert report.architecture == "gpt2"
    assert len(report.modules) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    assert module_report(report, C_ATTN).shape == [32, 96]  # Conv1D stores (in, out)
    _check_clean_peft(report, gpt2.base_sd, gpt2.deltas)


def test_peft_default_init_is_zero_everywhere(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS))
    peft_model.save_pretrained(tmp_path / "adapter")
    report = loratool.inspect(tmp_path / "adapter")
    names = [m.name for m in report.modules]
    assert len(names) == 2 * len(LLAMA_TARGETS)
    assert triples(report) == ordered([("zero-module", "warning", n) for n in names])


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(("base_dtype", "severity"), [(torch.float16, "error"), (torch.float32, "warning")])
def test_fp16_overflow_against_base(tmp_path: Path, llama, base_dtype: torch.dtype, severity: str) -> None:
    def hot_base(sd):
        for k in sd:
            sd[k] = sd[k].to(base_dtype)
        sd[Q0 + ".weight"][0, 0] = 65000.0

    def push_up(sd):  # scale 2: delta[0, 0] = 2 * (20 * 20 + small) ~ +800
        sd[f"{WRAP}{Q0}.lora_B.weight"][0, 0] = 20.0
        sd[f"{WRAP}{Q0}.lora_A.weight"][0, 0] = 20.0

    base = _edited_base(llama.base, tmp_path / "base", hot_base)
    adapter = _edited_adapter(llama.adapter, tmp_path / "adapter", push_up)
    # The update alone fits fp16 comfortably; the merge does not.
    assert problems(loratool.inspect(adapter)) == []
    report = loratool.inspect(adapter, base=base)
    assert problems(report) == [("fp16-overflow", severity, Q0)]


C_ATTN = "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize(("hot", "overflows"), [((0, 5), True), ((5, 0), False)], ids=["aligned", "transposed"])
def test_fp16_overflow_against_a_transposed_base(tmp_path: Path, gpt2, hot: tuple[int, int], overflows: bool) -> None:
    """GPT-2's Conv1D stores W as (in, out): the update for (out 5, in 0) lands on the stored [0, 5]."""

    def hot_base(sd):
        for k in sd:
            sd[k] = sd[k].half()
        sd[C_ATTN + ".weight"][hot] = 65000.0

    def push_up(sd):  # scale 2: delta[out 5, in 0] = 2 * (20 * 20 + small) ~ +800
        sd[f"{WRAP}{C_ATTN}.lora_B.weight"][5, 0] = 20.0
        sd[f"{WRAP}{C_ATTN}.lora_A.weight"][0, 0] = 20.0

    base = _edited_base(gpt2.base, tmp_path / "base", hot_base)
    adapter = _edited_adapter(gpt2.adapter, tmp_path / "adapter", push_up)
    report = loratool.inspect(adapter, base=base)
    assert problems(report) == ([("fp16-overflow", "error", C_ATTN)] if overflows else [])


def test_unknown_key_against_base(tmp_path: Path, llama) -> None:
    extra = "model.layers.0.self_attn.extra_proj"

    def add_module(sd):
        g = torch.Generator().manual_seed(4)
        sd[f"{WRAP}{extra}.lora_A.weight"] = torch.randn(8, 32, generator=g) * 0.1
        sd[f"{WRAP}{extra}.lora_B.weight"] = torch.randn(32, 8, generator=g) * 0.1

    adapter = _edited_adapter(llama.adapter, tmp_path / "adapter", add_module)
    assert problems(loratool.inspect(adapter)) == []
    report = loratool.inspect(adapter, base=llama.base)
    assert problems(report) == [("unknown-key", "error", extra)]


def test_shape_mismatch_against_base(tmp_path: Path, llama) -> None:
    def widen(sd):
        sd[f"{WRAP}{Q0}.lora_B.weight"] = torch.randn(40, 8, generator=torch.Generator().manual_seed(6)) * 0.1

    adapter = _edited_adapter(llama.adapter, tmp_path / "adapter", widen)
    assert problems(loratool.inspect(adapter)) == []  # the factors fit each other
    report = loratool.inspect(adapter, base=llama.base)
    assert problems(report) == [("shape-mismatch", "error", Q0)]


# ---------------------------------------------------------------------------------------------------
# LyCORIS files
# ---------------------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 16, 1)
        self.proj = nn.Linear(16, 32)
        self.big = nn.Linear(256, 256)  # big enough for a factored LoKr w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never run
        return x


def _forward_delta_norm(layer: nn.Module) -> float:
    """||delta W|| as the wrapped layer's forward pass applies it: response to one-hot inputs."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            x = torch.eye(layer.in_features)
            return float((layer(x) - F.linear(x, layer.weight, layer.bias)).norm())
        k = layer.kernel_size[0]
        n = layer.in_channels * k * k
        x = torch.eye(n).reshape(n, layer.in_channels, k, k)
        centre = (..., k // 2, k // 2)  # the output pixel whose receptive field is the whole input
        wrapped = layer(x)[centre]
        plain = F.conv2d(x, layer.weight, layer.bias, padding=layer.padding)[centre]
        return float((wrapped - plain).norm())


@pytest.fixture
def lycoris_preset(monkeypatch):
    """SmallNet's four layers by name; the preset is global class state, restored after the test."""
    from lycoris import LycorisNetwork

    preset = {
        "ENABLE_CONV": True,
        "TARGET_REPLACE_MODULE": [],
        "TARGET_REPLACE_NAME": ["conv", "pw", "proj", "big"],
        "MODULE_ALGO_MAP": {},
        "NAME_ALGO_MAP": {},
        "LORA_PREFIX": "lycoris",
        "USE_FNMATCH": False,
        "TARGET_EXCLUDE_NAME": [],
    }
    for attr, value in preset.items():
        monkeypatch.setattr(LycorisNetwork, attr, value)


def _lycoris_file(path: Path, algo: str):
    from lycoris import create_lycoris

    torch.manual_seed(0)
    model = SmallNet()
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, algo=algo)
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.1)
    network.save_weights(str(path), torch.float32, {})
    return model, network


@pytest.mark.parametrize(("algo", "kind"), [("locon", "lora"), ("loha", "loha"), ("lokr", "lokr")])
def test_lycoris_files(tmp_path: Path, lycoris_preset, algo: str, kind: str) -> None:
    path = tmp_path / f"{algo}.safetensors"
    model, network = _lycoris_file(path, algo)
    report = loratool.inspect(path)
    assert report.format == "lycoris"
    assert report.architecture is None
    assert triples(report) == [("unknown-architecture", "info", None)]
    lyco = {m.lora_name: m for m in network.loras}
    assert sorted(m.name for m in report.modules) == sorted(lyco)
    assert len(lyco) == 4
    layers = dict(model.named_children())
    full_lokr = 0
    for m in report.modules:
        ref = lyco[m.name]
        assert m.kind == kind, m.name
        assert m.alpha == pytest.approx(float(ref.alpha)), m.name
        assert m.scale == pytest.approx(ref.scale), m.name
        if algo == "lokr" and ref.use_w1 and ref.use_w2:
            full_lokr += 1
            assert m.rank is None and m.scale == 1.0, m.name  # both factors full: no rank, scale 1
        else:
            assert m.rank == ref.lora_dim, m.name
        layer = layers[m.name.removeprefix("lycoris_")]
        assert math.prod(m.shape) == layer.weight.numel(), m.name
        assert m.shape[0] == layer.weight.shape[0], m.name
        assert m.dw_norm == pytest.approx(_forward_delta_norm(layer), rel=1e-4), m.name
    if algo == "lokr":
        assert 0 < full_lokr < len(lyco)  # both the full-factor and the factored LoKr cases are covered


def test_lycoris_missing_alpha_means_rank(tmp_path: Path, lycoris_preset) -> None:
    path = tmp_path / "loha.safetensors"
    _lycoris_file(path, "loha")
    sd = load_file(str(path))
    del sd["lycoris_proj.alpha"]
    save_file(sd, str(path))
    report = loratool.inspect(path)
    proj = module_report(report, "lycoris_proj")
    assert (proj.rank, proj.alpha, proj.scale) == (4, 4.0, 1.0)
    assert triples(report) == [("alpha-missing", "warning", "lycoris_proj"), ("unknown-architecture", "info", None)]
