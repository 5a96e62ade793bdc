"""extract on narrow SD1.5 / SDXL / Flux checkpoints and diffusers folders, checked against a full SVD and diffusers.

Every fine-tune here is synthetic: TUNED = BASE + a planted rank-4 change (singular values 8:4:2:1) plus a
little noise, on every weight matrix of the model, targeted or not. Extracting at rank 3 therefore has a
known best answer per module, the rank-3 truncation of D = TUNED - BASE, whose relative error
sqrt(sum_{i>3} s_i^2) / ||D||_F a full `torch.linalg.svd` gives here. A LoRA is judged by baking it back
into BASE with `loratool.merge` (checked against diffusers in test_merge_diffusers.py) and measuring
||W_merged - W_tuned||_F / ||D||_F per module, on the diffusers / transformers weights that diffusers' own
single-file converters make of the merged file (so OpenCLIP's in_proj and Flux's qkv / linear1 are measured
per row block, and Flux's final modulation in diffusers' half order). What the file proves:

- SD1.5 (LDM keys, UNet + CLIP-L): every extracted module is within 1.001x of its optimum, with the
  randomized SVD and with exact=True; exactly the default targets (attention, MLP, proj_in / proj_out) are
  extracted, and every other tensor of the merge is BASE's; the report's errors are the measured ones.
  The file loads into a StableDiffusionPipeline of the tiny models with `load_lora_weights` (diffusers logs
  no warning: no unexpected or missing keys) and after `fuse_lora` the pipeline holds our merge's weights.
- conv_rank: the ResNet and sampler modules join, kxk convs as LoCon (down (r, in, kh, kw), up
  (out, r, 1, 1)) at the conv rank, each at the optimum of its flattened (out, in*kh*kw) delta, and
  diffusers loads and fuses them too; without conv_rank none of them is extracted.
- SDXL: te2's q/k/v, row blocks of OpenCLIP's in_proj_weight, come out as lora_te2_..._q_proj/k_proj/v_proj,
  each at the optimum of its own row block; the UNet's modules carry kohya's sgm names.
- Flux (BFL keys, bare and under `model.diffusion_model.`): kohya gets one module per fused qkv / linear1
  (one factor pair over all its rows); to="diffusers" gets to_q/to_k/to_v/proj_mlp, each at the optimum of
  its row block, and loads into diffusers' Flux transformer whose fuse is our merge. The final modulation
  (BFL stores its halves swapped) merges back to TUNED's halves with either layout.
- A diffusers folder BASE, with a single-file or a folder TUNED, gives the factors of the single-file pair.
- to="peft" of UNet + text encoder is refused; exclude='^text_encoder' (and include='^unet\\.') make a PEFT
  dir that PEFT loads onto the tiny UNet, whose merge_and_unload is at the optimum in every adapted module.
- BASE SD1.5 with TUNED SDXL, and a TUNED module of another shape, are ExtractErrors; nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import loratool
from loratool.archs import get_architecture
from loratool.errors import ExtractError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from test_merge_diffusers import BFL_PREFIX, base_checkpoint, components, plain_weights, save  # noqa: E402
from tiny_models import clip_config, clip_text_model, flux_transformer, sd15_unet, sdxl_unet  # noqa: E402
from transformers import CLIPTextModelWithProjection  # noqa: E402

pytestmark = pytest.mark.usefixtures("sketch_every_module")


RANK, CONV_RANK = 3, 2
PLANTED = (8.0, 4.0, 2.0, 1.0)  # singular values of the planted change, before scaling
NOISE = 0.02  # ||noise||_F relative to ||planted||_F
CHANGE = 0.3  # ||D||_F relative to ||W_base||_F
SLACK = 1.001  # allowed factor over the optimal truncation error
RTOL, ATOL = 1e-5, 1e-6
UNET_PREFIX = "model.diffusion_model."

StateDict = dict[str, torch.Tensor]
Views = dict[str, StateDict]  # component -> diffusers / transformers weight key (or BFL key) -> tensor

# Default targets, as keys of the diffusers / transformers models: attention, MLP and the transformer blocks'
# projections. With conv_rank the ResNet and sampler modules join them.
SD_DEFAULT = re.compile(
    r"(\.attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)))"
    r"|\.self_attn\.(q|k|v|out)_proj|\.mlp\.fc[12])\.weight$"
)
SD_CONV = re.compile(
    r"(\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|\.(down|up)samplers\.0\.conv)\.weight$"
)
KOHYA_TE = {"sd1": {"text_encoder": "lora_te_"}, "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
# Flux, in BFL keys (kohya's names) and in diffusers keys; the final modulation comes in through `include`.
FLUX_BFL_TARGETS = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(mod\.lin|attn\.(qkv|proj)|mlp\.[02])"
    r"|single_blocks\.\d+\.(modulation\.lin|linear[12])"
    r"|final_layer\.adaLN_modulation\.1)\.weight$"
)
FLUX_DIFFUSERS_TARGETS = re.compile(
    r"^(transformer_blocks\.\d+\.(norm1(_context)?\.linear|attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2))|single_transformer_blocks\.\d+\.(norm\.linear|attn\.to_[qkv]|proj_mlp|proj_out)"
    r"|norm_out\.linear)\.weight$"
)
FLUX_INCLUDE = r"transformer_blocks\.|norm_out\.linear"  # the default targets plus the final modulation
FINAL_MODULATION = "lora_unet_final_layer_adaLN_modulation_1"


# -- the synthetic fine-tune -------------------------------------------------------------------------------------
def planted(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """W + D with D = a rank-4 matrix of singular values 8:4:2:1 plus NOISE of it, ||D|| = CHANGE ||W||."""
    rows, cols = w.shape[0], w[0].numel()
    k = min(len(PLANTED), rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64)).Q
    s = torch.tensor(PLANTED[:k], dtype=torch.float64)
    noise = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    d = (u * (s / s.norm())) @ v.T + NOISE * noise / noise.norm()
    d = d * (CHANGE * max(float(w.double().norm()), 1.0) / float(d.norm()))
    return (w.double() + d.reshape(w.shape)).to(w.dtype).contiguous()


def fine_tune(sd: StateDict, seed: int) -> StateDict:
    """Every weight matrix (linear, conv, embedding; fused ones whole) changed; biases kept."""
    g = torch.Generator().manual_seed(seed)
    return {k: planted(v, g) if k.endswith("weight") and v.ndim >= 2 else v.clone() for k, v in sd.items()}


def optimum(d: torch.Tensor, rank: int) -> float:
    """||D - D_rank||_F / ||D||_F of the best rank-`rank` approximation (full SVD of the flattened delta)."""
    s = torch.linalg.svdvals(d.double().flatten(1))
    return math.sqrt(float(s[rank:].square().sum()) / float(s.square().sum()))


def relative_error(got: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor) -> float:
    return float((got.double() - tuned.double()).norm() / (tuned.double() - base.double()).norm())


# -- models and checkpoints ---------------------------------------------------------------------------------------
@dataclass(repr=False)
class Pair:
    family: str  # sd1 | sdxl | flux
    base: Path
    tuned: Path
    config: dict  # the UNet's / transformer's config, for diffusers' converters
    views: dict[str, Views] = field(default_factory=dict)  # "base" / "tuned" -> diffusers weights

    def view(self, path: Path) -> Views:
        return components(load_file(str(path)), self.family, self.config)

    def __repr__(self) -> str:
        return f"Pair({self.family}: {self.base.name}, {self.tuned.name})"


def make_pair(tmp: Path, family: str, models: dict[str, torch.nn.Module], arch: str, seed: int) -> Pair:
    sd = base_checkpoint(get_architecture(arch), models)
    config = dict(models["unet" if "unet" in models else "transformer"].config)
    pair = Pair(
        family, save(sd, tmp / "base.safetensors"), save(fine_tune(sd, seed), tmp / "tuned.safetensors"), config
    )
    pair.views = {"base": pair.view(pair.base), "tuned": pair.view(pair.tuned)}
    return pair


def sd15_models() -> dict[str, torch.nn.Module]:
    return {"unet": sd15_unet(), "text_encoder": clip_text_model()}


def sdxl_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(1)
    return {
        "unet": sdxl_unet(),
        "text_encoder": clip_text_model(),
        "text_encoder_2": CLIPTextModelWithProjection(clip_config()),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Every matrix here is tiny: two torch threads only wait on each other, and on a busy 2-core machine
    they made this file 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Pair:
    return make_pair(tmp_path_factory.mktemp("sd15"), "sd1", sd15_models(), "sd1", seed=10)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Pair:
    return make_pair(tmp_path_factory.mktemp("sdxl"), "sdxl", sdxl_models(), "sdxl", seed=20)


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Pair:
    return make_pair(tmp_path_factory.mktemp("flux"), "flux", {"transformer": flux_transformer()}, "flux1", seed=30)


def flux_files(flux: Pair, tmp: Path, prefix: str) -> tuple[Path, Path]:
    if not prefix:
        return flux.base, flux.tuned
    return tuple(
        save({prefix + k: v for k, v in load_file(str(p)).items()}, tmp / f"prefixed-{p.name}")
        for p in (flux.base, flux.tuned)
    )


def extract(base: Path, tuned: Path, dest: Path, **kwargs) -> loratool.ExtractReport:
    return loratool.extract(base, tuned, dest, device="cpu", **kwargs)


def merge_back(base: Path, lora: Path, dest: Path) -> Path:
    loratool.merge(base, [lora], dest, device="cpu")
    return dest


# -- what was extracted, and how well -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    component: str
    key: str  # the weight's key in the component's view
    rank: int


def fingerprint(t: torch.Tensor) -> tuple:
    return tuple(t.shape), hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


def sgm_paths(pair: Pair) -> dict[str, str]:
    """diffusers UNet key -> the single-file (LDM / sgm) module path holding the same tensor."""
    base = {k: v for k, v in load_file(str(pair.base)).items() if k.startswith(UNET_PREFIX)}
    shared = Counter(fingerprint(v) for v in base.values())  # freshly initialized norms: all ones or zeros
    index = {fingerprint(v): k for k, v in base.items()}
    unet = {k: w for k, w in pair.views["base"]["unet"].items() if shared[fingerprint(w)] == 1}
    out = {key: index[fingerprint(w)].removeprefix(UNET_PREFIX).removesuffix(".weight") for key, w in unet.items()}
    assert len(set(out.values())) == len(out)
    return out


def sd_targets(pair: Pair, conv_rank: int | None = None) -> dict[str, Target]:
    """kohya module name -> target, for every default target (with conv_rank also the ResNet / sampler modules).
    kohya names SD1's UNet modules by their diffusers paths and SDXL's by their sgm paths."""
    native = sgm_paths(pair) if pair.family == "sdxl" else {}
    out = {}
    for c, weights in pair.views["base"].items():
        for key, w in weights.items():
            default = bool(SD_DEFAULT.search(key))
            if not default and not (conv_rank is not None and SD_CONV.search(key)):
                continue
            kxk = w.ndim == 4 and tuple(w.shape[2:]) != (1, 1)
            if c == "unet":
                name = "lora_unet_" + native.get(key, key.removesuffix(".weight"))
            else:
                name = KOHYA_TE[pair.family][c] + "text_model." + key.removesuffix(".weight")
            out[name.replace(".", "_")] = Target(c, key, conv_rank if kxk and not default else RANK)
    return out


@dataclass
class Measured:
    error: float  # ||W_merged - W_tuned|| / ||D||
    best: float  # the optimum at the target's rank
    change: float  # ||D|| / ||W_base||


def check_against_optimum(base: Views, tuned: Views, merged: Views, targets: dict[str, Target]) -> dict[str, Measured]:
    """Each target within SLACK of its optimum, every other tensor of the components `targets` touch the base's."""
    by_key = {(t.component, t.key): name for name, t in targets.items()}
    assert len(by_key) == len(targets)
    measured, failures = {}, []
    for c in sorted({t.component for t in targets.values()}):
        assert merged[c].keys() == base[c].keys(), c
        assert {k for comp, k in by_key if comp == c} <= base[c].keys(), c
        for key, w in base[c].items():
            name = by_key.get((c, key))
            if name is None:
                if not torch.equal(merged[c][key], w):
                    failures.append(f"{c}.{key}: not a target, yet the merge changed it")
                continue
            d = tuned[c][key].double() - w.double()
            m = Measured(
                relative_error(merged[c][key], tuned[c][key], w),
                optimum(d, targets[name].rank),
                float(d.norm() / w.double().norm()),
            )
            measured[name] = m
            if not m.error <= SLACK * m.best:
                failures.append(f"{name} ({c}.{key}): relative error {m.error:.6f} > {SLACK} x optimum {m.best:.6f}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:12])
    return measured


def check_report(report: loratool.ExtractReport, targets: dict[str, Target], measured: dict[str, Measured]) -> None:
    """The report names exactly the targets, at their ranks, with the errors and changes measured."""
    assert report.skipped == []
    assert sorted(m.name for m in report.modules) == sorted(targets)
    for m in report.modules:
        assert m.rank == targets[m.name].rank, m
        want = measured.get(m.name)
        if want is None:  # a module not measured here
            continue
        # the report's error is the SVD's own estimate; the merge's is measured through fp32 weights
        assert m.relative_error == pytest.approx(want.error, rel=1e-3), m
        assert m.retained == pytest.approx(1 - want.error**2, rel=1e-4), m
        assert m.change == pytest.approx(want.change, rel=1e-5), m


def lora_file(path: Path) -> tuple[StateDict, dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open is no dict)


def modules_of(lora: StateDict) -> set[str]:
    return {k.split(".", 1)[0] for k in lora}


@contextmanager
def diffusers_warnings() -> Iterator[list[logging.LogRecord]]:
    """What diffusers logs at WARNING or above (unexpected / missing LoRA keys, a component without LoRA keys);
    its library logger does not propagate, so the handler goes on it."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def tiny_pipeline(models: dict[str, torch.nn.Module]) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=models["text_encoder"],
        tokenizer=None,
        unet=models["unet"],
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def lora_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def assert_close_views(got: Views, want: Views) -> None:
    """`want`'s tensors (the single-file converters' view: no norms) are in `got` with the same values."""
    for c, weights in want.items():
        assert set(weights) <= set(got[c]), (c, sorted(set(weights) - set(got[c]))[:5])
        for key, w in weights.items():
            torch.testing.assert_close(got[c][key], w, rtol=RTOL, atol=ATOL, msg=lambda m, k=f"{c}.{key}": f"{k}: {m}")


def load_and_fuse(lora: Path, models: dict[str, torch.nn.Module], names: set[str]) -> Views:
    """The kohya file through `StableDiffusionPipeline.load_lora_weights` and `fuse_lora`; no warning logged,
    one LoRA layer per module of the file."""
    pipe = tiny_pipeline(models)
    with diffusers_warnings() as warned:
        pipe.load_lora_weights(str(lora))
    assert [r.getMessage() for r in warned] == []
    assert lora_layers(pipe.unet) == sum(n.startswith("lora_unet_") for n in names)
    assert lora_layers(pipe.text_encoder) == sum(n.startswith("lora_te_") for n in names)
    pipe.fuse_lora()
    return {c: plain_weights(getattr(pipe, c)) for c in models}


# -- 1. SD1.5: merge back meets the optimum ------------------------------------------------------------------------
@pytest.mark.parametrize("exact", [False, True], ids=["randomized", "exact"])
def test_sd15_kohya_extract_merges_back_within_the_svd_optimum(sd15, tmp_path, exact):
    lora = tmp_path / "lora.safetensors"
    report = extract(sd15.base, sd15.tuned, lora, rank=RANK, exact=exact)
    assert (report.architecture, report.target, report.exact) == ("sd1", "kohya", exact)
    targets = sd_targets(sd15)
    assert len(targets) == 16 * 12 + 2 * 6  # 16 transformer blocks of 12 modules, 2 CLIP layers of 6

    tensors, metadata = lora_file(lora)
    assert modules_of(tensors) == set(targets)
    assert json.loads(metadata["loratool.extracted_from"])["svd"] == ("exact" if exact else "randomized")
    for name, t in targets.items():
        w = sd15.views["base"][t.component][t.key]
        ones = (1, 1) if w.ndim == 4 else ()  # SD1's proj_in / proj_out are 1x1 convs
        assert tensors[f"{name}.lora_down.weight"].shape == (RANK, w.shape[1], *ones), name
        assert tensors[f"{name}.lora_up.weight"].shape == (w.shape[0], RANK, *ones), name
        assert float(tensors[f"{name}.alpha"]) == RANK

    merged = sd15.view(merge_back(sd15.base, lora, tmp_path / "merged.safetensors"))
    measured = check_against_optimum(sd15.views["base"], sd15.views["tuned"], merged, targets)
    check_report(report, targets, measured)


# -- 2. SD1.5: diffusers loads the kohya file, and its fuse is our merge --------------------------------------------
def test_sd15_kohya_loads_in_a_diffusers_pipeline_and_fuses_to_our_merge(sd15, tmp_path):
    lora = tmp_path / "lora.safetensors"
    extract(sd15.base, sd15.tuned, lora, rank=RANK)
    merged = sd15.view(merge_back(sd15.base, lora, tmp_path / "merged.safetensors"))
    models = sd15_models()  # the tiny models are BASE
    assert_close_views({c: plain_weights(m) for c, m in models.items()}, sd15.views["base"])
    fused = load_and_fuse(lora, models, modules_of(lora_file(lora)[0]))
    assert_close_views(fused, merged)


# -- 3. conv_rank: LoCon for kxk convs ---------------------------------------------------------------------------------
def test_sd15_conv_rank_extracts_resnet_convs_as_locon(sd15, tmp_path):
    lora = tmp_path / "locon.safetensors"
    report = extract(sd15.base, sd15.tuned, lora, rank=RANK, conv_rank=CONV_RANK)
    targets = sd_targets(sd15, conv_rank=CONV_RANK)
    default = sd_targets(sd15)
    kxk = {n for n, t in targets.items() if t.rank == CONV_RANK}
    assert len(kxk) == 2 * 22 + 3 + 3  # conv1 / conv2 of 22 ResNets, 3 downsamplers, 3 upsamplers
    assert {n for n in targets if n.endswith(("_conv_shortcut", "_time_emb_proj"))}

    tensors, metadata = lora_file(lora)
    assert modules_of(tensors) == set(targets)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": str(CONV_RANK), "conv_alpha": str(CONV_RANK)}
    for name in kxk:
        t = targets[name]
        out_ch, in_ch, kh, kw = sd15.views["base"][t.component][t.key].shape
        assert (kh, kw) == (3, 3)
        assert tensors[f"{name}.lora_down.weight"].shape == (CONV_RANK, in_ch, kh, kw), name
        assert tensors[f"{name}.lora_up.weight"].shape == (out_ch, CONV_RANK, 1, 1), name
        assert float(tensors[f"{name}.alpha"]) == CONV_RANK

    merged = sd15.view(merge_back(sd15.base, lora, tmp_path / "merged.safetensors"))
    measured = check_against_optimum(sd15.views["base"], sd15.views["tuned"], merged, targets)
    check_report(report, targets, measured)
    assert_close_views(load_and_fuse(lora, sd15_models(), set(targets)), merged)  # diffusers reads LoCon alike

    plain = tmp_path / "plain.safetensors"  # without conv_rank: none of the ResNet / sampler modules
    report = extract(sd15.base, sd15.tuned, plain, rank=RANK)
    assert {m.name for m in report.modules} == modules_of(lora_file(plain)[0]) == set(default) < set(targets)


# -- 4. SDXL: OpenCLIP's fused in_proj as q/k/v ----------------------------------------------------------------------
def test_sdxl_te2_in_proj_rows_come_out_as_q_k_v_at_their_optimum(sdxl, tmp_path):
    lora = tmp_path / "lora.safetensors"
    report = extract(sdxl.base, sdxl.tuned, lora, rank=RANK)
    assert report.architecture == "sdxl"
    targets = sd_targets(sdxl)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in targets  # kohya's sgm names
    qkv = {f"lora_te2_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in (0, 1) for p in "qkv"}
    assert qkv <= set(targets)

    tensors, _ = lora_file(lora)
    assert modules_of(tensors) == set(targets)
    width = clip_config().hidden_size
    for name in qkv:  # one row block each, not all of in_proj
        assert tensors[f"{name}.lora_up.weight"].shape == (width, RANK)
        assert tensors[f"{name}.lora_down.weight"].shape == (RANK, width)

    # diffusers' OpenCLIP converter splits the merged in_proj_weight into q/k/v: each block is measured alone
    merged = sdxl.view(merge_back(sdxl.base, lora, tmp_path / "merged.safetensors"))
    te = {n: t for n, t in targets.items() if t.component != "unet"}
    measured = check_against_optimum(sdxl.views["base"], sdxl.views["tuned"], merged, te)
    check_report(report, targets, measured)


def test_sdxl_unet_kohya_modules_merge_back_within_the_svd_optimum(sdxl, tmp_path):
    lora = tmp_path / "lora.safetensors"
    report = extract(sdxl.base, sdxl.tuned, lora, rank=RANK)
    targets = {n: t for n, t in sd_targets(sdxl).items() if t.component == "unet"}
    merged = sdxl.view(merge_back(sdxl.base, lora, tmp_path / "merged.safetensors"))
    measured = check_against_optimum(sdxl.views["base"], sdxl.views["tuned"], merged, targets)
    check_report(report, sd_targets(sdxl), measured)


# -- 5. Flux: fused rows whole for kohya, split for diffusers; the final modulation's halves -----------------------
def bfl_view(path: Path) -> Views:
    return {"transformer": {k.removeprefix(BFL_PREFIX): v for k, v in load_file(str(path)).items()}}


def flux_kohya_targets(base: Views) -> dict[str, Target]:
    return {
        "lora_unet_" + key.removesuffix(".weight").replace(".", "_"): Target("transformer", key, RANK)
        for key in base["transformer"]
        if FLUX_BFL_TARGETS.search(key)
    }


PREFIXES = pytest.mark.parametrize("prefix", ["", BFL_PREFIX], ids=["bare", "model.diffusion_model"])


@PREFIXES
def test_flux_kohya_has_one_module_per_fused_qkv_and_linear1(flux, tmp_path, prefix):
    base, tuned = flux_files(flux, tmp_path, prefix)
    lora = tmp_path / "lora.safetensors"
    report = extract(base, tuned, lora, rank=RANK, include=FLUX_INCLUDE)
    assert (report.architecture, report.target) == ("flux1", "kohya")
    views = {"base": bfl_view(base), "tuned": bfl_view(tuned)}
    targets = flux_kohya_targets(views["base"])
    fused = {n for n in targets if n.endswith(("_attn_qkv", "_linear1"))}
    assert len(fused) == 2 * 2 + 2  # img/txt qkv of 2 double blocks, linear1 of 2 single blocks
    assert sorted(m.name for m in report.modules) == sorted(targets)

    tensors, metadata = lora_file(lora)
    assert modules_of(tensors) == set(targets)
    assert metadata["ss_base_model_version"] == "flux1"
    for name in fused:  # one factor pair over all the fused rows
        rows, cols = views["base"]["transformer"][targets[name].key].shape
        assert tensors[f"{name}.lora_up.weight"].shape == (rows, RANK)
        assert tensors[f"{name}.lora_down.weight"].shape == (RANK, cols)

    # the final modulation, whose halves the single file swaps, merges back to TUNED's rows: diffusers'
    # converter swaps the halves back, and the merged weight is at the optimum of TUNED's
    merged = merge_back(base, lora, tmp_path / "merged.safetensors")
    assert all(k.startswith(prefix) for k in load_file(str(merged)))
    key = "norm_out.linear.weight"
    w, want = flux.views["base"]["transformer"][key], flux.views["tuned"]["transformer"][key]
    got = flux.view(merged)["transformer"][key]
    assert relative_error(got, want, w) <= SLACK * optimum(want - w, RANK)


@PREFIXES
def test_flux_kohya_fused_modules_merge_back_within_the_svd_optimum(flux, tmp_path, prefix):
    base, tuned = flux_files(flux, tmp_path, prefix)
    lora = tmp_path / "lora.safetensors"
    report = extract(base, tuned, lora, rank=RANK, include=FLUX_INCLUDE)
    views = {"base": bfl_view(base), "tuned": bfl_view(tuned)}
    targets = flux_kohya_targets(views["base"])
    merged = bfl_view(merge_back(base, lora, tmp_path / "merged.safetensors"))
    measured = check_against_optimum(views["base"], views["tuned"], merged, targets)  # fused: over all rows
    check_report(report, targets, measured)


@PREFIXES
def test_flux_diffusers_output_splits_fused_rows_each_at_its_optimum(flux, tmp_path, prefix):
    base, tuned = flux_files(flux, tmp_path, prefix)
    lora = tmp_path / "lora.safetensors"
    report = extract(base, tuned, lora, rank=RANK, include=FLUX_INCLUDE, to="diffusers")
    assert report.target == "diffusers"
    targets = {
        "transformer." + key.removesuffix(".weight"): Target("transformer", key, RANK)
        for key in flux.views["base"]["transformer"]
        if FLUX_DIFFUSERS_TARGETS.search(key)
    }
    for block in ("transformer_blocks.0.attn", "single_transformer_blocks.1.attn"):
        assert {f"transformer.{block}.to_{p}" for p in "qkv"} <= set(targets)
    assert {"transformer.single_transformer_blocks.0.proj_mlp", "transformer.norm_out.linear"} <= set(targets)

    tensors, _ = lora_file(lora)
    assert {k.rsplit(".", 2)[0] for k in tensors} == set(targets)

    # merged back into the BFL file, read by diffusers' converter (which splits qkv / linear1 and swaps the
    # modulation's halves back): every row block at its own optimum
    merged = flux.view(merge_back(base, lora, tmp_path / "merged.safetensors"))
    measured = check_against_optimum(flux.views["base"], flux.views["tuned"], merged, targets)
    check_report(report, targets, measured)

    # diffusers' own loader on the tiny transformer (= BASE): its fuse is the same
    model = flux_transformer()
    with diffusers_warnings() as warned:
        state_dict, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
            str(lora), return_alphas=True, return_lora_metadata=True
        )
        model.load_lora_adapter(state_dict, prefix="transformer", network_alphas=alphas, metadata=metadata)
    assert [r.getMessage() for r in warned] == []
    assert lora_layers(model) == len(targets)
    model.fuse_lora()
    assert_close_views({"transformer": plain_weights(model)}, merged)


# -- 6. a diffusers folder is the same model as its single file ----------------------------------------------------
def save_folder(models: dict[str, torch.nn.Module], weights: Views | None, dest: Path) -> Path:
    for component, model in models.items():
        if weights is not None:
            result = model.load_state_dict(weights[component], strict=False)
            assert result.unexpected_keys == []
            assert all(re.search(r"norm|position_ids", k) for k in result.missing_keys), result.missing_keys
    tiny_pipeline(models).save_pretrained(dest)
    assert (dest / "model_index.json").is_file()
    return dest


def products(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = lora_file(path)
    return {
        n: tensors[f"{n}.lora_up.weight"].flatten(1) @ tensors[f"{n}.lora_down.weight"].flatten(1)
        for n in modules_of(tensors)
    }


def test_diffusers_folder_base_and_tuned_extract_what_the_single_files_do(sd15, tmp_path):
    base_dir = save_folder(sd15_models(), None, tmp_path / "base")
    tuned_dir = save_folder(sd15_models(), sd15.views["tuned"], tmp_path / "tuned")
    want = tmp_path / "single.safetensors"
    single = extract(sd15.base, sd15.tuned, want, rank=RANK)
    expected = products(want)  # at the optimum: test_sd15_kohya_extract_merges_back_within_the_svd_optimum
    assert set(expected) == set(sd_targets(sd15))
    errors = {m.name: m.relative_error for m in single.modules}
    for name, (base, tuned) in {"folder-file": (base_dir, sd15.tuned), "folder-folder": (base_dir, tuned_dir)}.items():
        dest = tmp_path / f"{name}.safetensors"
        report = extract(base, tuned, dest, rank=RANK)
        assert report.architecture == "sd1", name
        got = products(dest)
        assert got.keys() == expected.keys(), name
        for module, p in got.items():
            torch.testing.assert_close(p, expected[module], rtol=RTOL, atol=ATOL, msg=lambda m, k=module: f"{k}: {m}")
        assert {m.name: m.relative_error for m in report.modules} == pytest.approx(errors, rel=1e-4), name


# -- 7. PEFT wraps one model --------------------------------------------------------------------------------------
def test_peft_output_of_unet_and_text_encoder_is_refused_unless_include_picks_one(sd15, tmp_path):
    dest = tmp_path / "adapter"
    with pytest.raises(ExtractError, match=r"PEFT.*text_encoder, unet"):
        extract(sd15.base, sd15.tuned, dest, rank=RANK, to="peft")
    assert list(tmp_path.iterdir()) == []

    excluded = extract(sd15.base, sd15.tuned, tmp_path / "excluded", rank=RANK, to="peft", exclude=r"^text_encoder")
    report = extract(sd15.base, sd15.tuned, dest, rank=RANK, to="peft", include=r"^unet\.")
    assert report.target == "peft"
    assert {p.name for p in dest.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((dest / "adapter_config.json").read_text())
    extracted = {m.name.removeprefix("base_model.model.") for m in report.modules}
    assert extracted == set(config["target_modules"])
    default_unet = {t.key.removesuffix(".weight") for t in sd_targets(sd15).values() if t.component == "unet"}
    assert default_unet <= extracted  # every default UNet target, nothing of the text encoder
    # exclude narrows the default set to the UNet's targets; include picks any UNet module it
    # matches (the time embedding too), but kxk convs only ever with conv_rank.
    assert {m.name.removeprefix("base_model.model.") for m in excluded.modules} == default_unet
    assert not any("resnets" in name or name in ("conv_in", "conv_out") for name in extracted)
    assert extracted <= {k.removesuffix(".weight") for k in sd15.views["base"]["unet"]}

    # PEFT itself loads the dir onto the tiny UNet (= BASE); merged, every adapted module is at its optimum
    unet = PeftModel.from_pretrained(sd15_unet(), str(dest))
    adapted = {n.removeprefix("base_model.model.") for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == extracted
    fused = plain_weights(unet.merge_and_unload())
    merged = {"unet": {k: fused[k] for k in sd15.views["base"]["unet"]}}
    targets = {"base_model.model." + p: Target("unet", p + ".weight", RANK) for p in adapted}
    measured = check_against_optimum(sd15.views["base"], sd15.views["tuned"], merged, targets)
    check_report(report, targets, measured)


# -- 8. errors ------------------------------------------------------------------------------------------------------
def test_base_and_tuned_of_different_architectures_are_refused(sd15, sdxl, tmp_path):
    dest = tmp_path / "lora.safetensors"
    with pytest.raises(ExtractError) as info:
        extract(sd15.base, sdxl.tuned, dest, rank=RANK)
    message = str(info.value)
    assert re.search(r"\bsd1\b", message) and re.search(r"\bsdxl\b", message), message
    assert list(tmp_path.iterdir()) == []


def test_tuned_with_a_module_of_another_shape_is_refused(sd15, tmp_path):
    key = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    tuned = load_file(str(sd15.tuned))
    tuned[key] = torch.zeros(tuned[key].shape[0] + 8, tuned[key].shape[1])
    wide = save(tuned, tmp_path / "wide.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExtractError, match="lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"):
        extract(sd15.base, wide, out / "lora.safetensors", rank=RANK)
    assert list(out.iterdir()) == []


def test_kohya_cannot_leave_out_part_of_a_fused_module(flux, tmp_path):
    """kohya names Flux's qkv as one module: excluding k alone cannot be honoured, and is not ignored."""
    base, tuned = flux_files(flux, tmp_path, "")
    lora = tmp_path / "lora.safetensors"
    with pytest.raises(ExtractError, match="one fused module"):
        extract(base, tuned, lora, rank=RANK, exclude=r"transformer_blocks\.0\.attn\.to_k$")
    assert not lora.exists()
    report = extract(base, tuned, lora, rank=RANK, exclude=r"transformer_blocks\.0\.attn\.to_k$", to="diffusers")
    names = {m.name for m in report.modules}
    assert "transformer.transformer_blocks.0.attn.to_k" not in names
    assert "transformer.transformer_blocks.0.attn.to_q" in names


# -- ComfyUI's layout: the same factors under the names ComfyUI reads ------------------------------------------------
def test_flux_extract_to_comfyui_is_the_kohya_extract_renamed(flux, tmp_path):
    kohya, comfy = tmp_path / "kohya.safetensors", tmp_path / "comfy.safetensors"
    extract(flux.base, flux.tuned, kohya, rank=RANK, include=FLUX_INCLUDE, exact=True)
    report = extract(flux.base, flux.tuned, comfy, rank=RANK, include=FLUX_INCLUDE, exact=True, to="comfyui")
    assert report.target == "comfyui"
    ours, theirs = lora_file(comfy)[0], lora_file(kohya)[0]
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")

    def as_kohya(key: str) -> str:
        suffix = next(s for s in suffixes if key.endswith(s))
        return "lora_unet_" + key.removeprefix("diffusion_model.").removesuffix(suffix).replace(".", "_") + suffix

    assert all(k.startswith("diffusion_model.") for k in ours)
    assert {as_kohya(k): v for k, v in ours.items()}.keys() == theirs.keys()
    assert all(torch.equal(v, theirs[as_kohya(k)]) for k, v in ours.items())
