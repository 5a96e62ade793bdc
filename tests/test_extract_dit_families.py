"""extract and resize on every image and video DiT family with a table, on tiny original single files.

For each family, BASE is the tiny diffusers transformer of its family test (the `TINY` config imported
from there) as an original single file, built as that test builds it; TUNED is BASE with an exact rank-2
change (singular values 2:1) planted on four default-target weights, a fused one (`qkv`, `img_attn_qkv`,
`linear1`) among them where the family has one, planted on the whole fused weight so every row block is
rank 2 as well. The video families: Wan 2.1 I2V (its modulation parameters in the file too), HunyuanVideo,
LTX-Video, and LTX-2 twice (its audio stream and cross-modal attentions; its video stream alone).
extract takes the randomized SVD here, as on full-size models (`sketch_every_module`).
What the file proves, for the kohya, diffusers and ComfyUI layouts:

- `extract(BASE, TUNED, rank=2)` writes exactly the changed modules (a fused weight as one module, or one
  per row block where the layout names row blocks), each exact, and skips the unchanged ones; merged back
  into BASE it is TUNED on the planted weights (within 1e-4 of the change) and BASE everywhere else, bit
  for bit.
- `resize(that LoRA, rank=1)` has rank 1 everywhere; merged into BASE, one (unfused) planted weight is
  BASE + the best rank-1 approximation of the change (`torch.linalg.svd`), and every planted weight is
  within that optimum's error (a row block cut alone does no worse).
- extract names the family, and `inspect` reads both files as the family: a FLUX.2 checkpoint is not
  taken for Flux.1 (whose table finds four modules in each `linear1`), and a Chroma LoRA in any layout
  names its model in metadata, since its modules' names and widths are all Flux.1's too; so do a
  HunyuanVideo LoRA whose kohya and diffusers names are all Flux.1's, and an LTX-2 LoRA on the video
  stream alone, whose names are LTX-Video's (and Anima's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from loratool.archs import get_architecture

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import test_family_anima as anima_test  # noqa: E402
import test_family_chroma as chroma_test  # noqa: E402
import test_family_flux2 as flux2_test  # noqa: E402
import test_family_hidream as hidream_test  # noqa: E402
import test_family_hunyuan_video as hunyuan_video_test  # noqa: E402
import test_family_ltx2 as ltx2_test  # noqa: E402
import test_family_ltx_video as ltx_video_test  # noqa: E402
import test_family_lumina2 as lumina2_test  # noqa: E402
import test_family_qwen_image as qwen_test  # noqa: E402
import test_family_sd3 as sd3_test  # noqa: E402
import test_family_wan as wan_test  # noqa: E402
import test_family_z_image as z_image_test  # noqa: E402
from diffusers import (  # noqa: E402
    AnimaTextConditioner,
    ChromaTransformer2DModel,
    CosmosTransformer3DModel,
    Flux2Transformer2DModel,
    HiDreamImageTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    Lumina2Transformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from test_merge_diffusers import base_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("sketch_every_module")

StateDict = dict[str, torch.Tensor]

RANK = 2
PLANTED = (2.0, 1.0)  # singular values of the planted change, before scaling
CHANGE = 0.3  # ||D||_F relative to ||W_base||_F
RTOL = 1e-4  # of ||D||_F
LAYOUTS = ("kohya", "diffusers", "comfyui")
BEST_RANK1 = PLANTED[1] / math.hypot(*PLANTED)  # ||D - D_1|| / ||D|| of the planted change


# -- the tiny models as their original single files, built as each family test builds them ------------------------
def _sd3() -> StateDict:
    model = SD3Transformer2DModel(**sd3_test.TINY)
    checkpoint = base_checkpoint(get_architecture("sd3.5-medium"), {"transformer": model})
    checkpoint["model.diffusion_model.pos_embed"] = model.pos_embed.pos_embed.clone()
    # the original file stores the last block's text modulation with its halves swapped
    stem = f"model.diffusion_model.joint_blocks.{sd3_test.TINY['num_layers'] - 1}.context_block.adaLN_modulation.1."
    for suffix in ("weight", "bias"):
        half = checkpoint[stem + suffix].shape[0] // 2
        checkpoint[stem + suffix] = torch.cat([checkpoint[stem + suffix][half:], checkpoint[stem + suffix][:half]])
    return checkpoint


def _qwen_image() -> StateDict:  # ComfyUI's split file: diffusers' names, no prefix
    return dict(QwenImageTransformer2DModel(**qwen_test.TINY).state_dict())


def _chroma() -> StateDict:
    return base_checkpoint(get_architecture("chroma"), {"transformer": ChromaTransformer2DModel(**chroma_test.TINY)})


def _flux2() -> StateDict:
    return base_checkpoint(get_architecture("flux2"), {"transformer": Flux2Transformer2DModel(**flux2_test.TINY)})


def _z_image() -> StateDict:
    model = ZImageTransformer2DModel(**z_image_test.TINY)
    checkpoint = base_checkpoint(get_architecture("z_image"), {"transformer": model})
    for pad in ("x_pad_token", "cap_pad_token"):  # parameters, not modules
        checkpoint[pad] = getattr(model, pad).detach().clone()
    return checkpoint


def _lumina2() -> StateDict:
    model = Lumina2Transformer2DModel(**lumina2_test.TINY)
    prefix = lumina2_test.PREFIX  # ComfyUI's repackaged checkpoint
    bare = base_checkpoint(get_architecture("lumina2"), {"transformer": model})
    checkpoint = {prefix + k: v for k, v in bare.items()}
    checkpoint[prefix + "norm_final.weight"] = torch.ones(lumina2_test.TINY["hidden_size"])
    return checkpoint


def _hidream() -> StateDict:
    model = HiDreamImageTransformer2DModel(**hidream_test.TINY)
    checkpoint = base_checkpoint(get_architecture("hidream"), {"transformer": model})
    checkpoint.update({k: v.detach().clone() for k, v in model.state_dict().items() if k not in checkpoint})  # routers
    return checkpoint


def _anima() -> StateDict:  # the transformer under `net.`, the text conditioner under `net.llm_adapter.`
    models = {
        "transformer": CosmosTransformer3DModel(**anima_test.TINY),
        "text_conditioner": AnimaTextConditioner(**anima_test.TINY_ADAPTER),
    }
    return base_checkpoint(get_architecture("anima"), models)


def _wan() -> StateDict:  # Wan 2.1 I2V, with each block's and the head's modulation parameters
    return wan_test.single_checkpoint(WanTransformer3DModel(**wan_test.TINY))


def _hunyuan_video() -> StateDict:  # fused img_attn_qkv / txt_attn_qkv / refiner self_attn_qkv / linear1
    model = HunyuanVideoTransformer3DModel(**hunyuan_video_test.TINY)
    return base_checkpoint(get_architecture("hunyuan_video"), {"transformer": model})


def _ltx_video() -> StateDict:
    model = LTXVideoTransformer3DModel(**ltx_video_test.TINY)
    prefix = ltx_video_test.PREFIX
    checkpoint = base_checkpoint(get_architecture("ltx_video"), {"transformer": model})
    for name, value in model.named_parameters():
        if name.endswith("scale_shift_table"):  # parameters, not modules
            checkpoint[prefix + name] = value.detach().clone()
    return checkpoint


def _ltx2() -> StateDict:
    model = LTX2VideoTransformer3DModel(**ltx2_test.TINY["ltx2"])
    prefix = ltx2_test.PREFIX
    checkpoint = base_checkpoint(get_architecture("ltx2"), {"transformer": model})
    renamed = {  # diffusers -> original, the other tables keep their names
        "video_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_video",
        "audio_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_audio",
    }
    for name, value in model.named_parameters():
        if name.endswith("scale_shift_table"):  # parameters, not modules
            head, _, last = name.rpartition(".")
            checkpoint[prefix + head + ("." if head else "") + renamed.get(last, last)] = value.detach().clone()
    return checkpoint


@dataclass(frozen=True)
class Family:
    build: Callable[[], StateDict]
    # the planted weights (original keys) with the modules the diffusers layout makes of each (its row
    # blocks); the first is fused where the family fuses, the second is never fused (resize's oracle)
    planted: tuple[tuple[str, int], ...]
    split_in: frozenset[str] = frozenset({"diffusers"})  # the layouts that name a fused weight's row blocks
    arch: str = ""  # the family, where its key names a second planting on it (else the key)


SD3, LUMINA, LTXV, LTX2 = "model.diffusion_model.", lumina2_test.PREFIX, ltx_video_test.PREFIX, ltx2_test.PREFIX
FAMILIES = {
    "sd3.5-medium": Family(
        _sd3,
        (
            (SD3 + "joint_blocks.0.x_block.attn.qkv.weight", 3),
            (SD3 + "joint_blocks.1.context_block.mlp.fc1.weight", 1),
            (SD3 + "joint_blocks.0.x_block.attn2.proj.weight", 1),
            (SD3 + "joint_blocks.1.x_block.adaLN_modulation.1.weight", 1),
        ),
    ),
    "qwen_image": Family(  # nothing fused
        _qwen_image,
        (
            ("transformer_blocks.0.attn.to_q.weight", 1),
            ("transformer_blocks.1.img_mlp.net.0.proj.weight", 1),
            ("transformer_blocks.0.txt_mod.1.weight", 1),
            ("transformer_blocks.1.attn.to_add_out.weight", 1),
        ),
    ),
    "chroma": Family(
        _chroma,
        (
            ("double_blocks.0.img_attn.qkv.weight", 3),
            ("double_blocks.1.txt_mlp.2.weight", 1),
            ("single_blocks.1.linear1.weight", 4),
            ("single_blocks.0.linear2.weight", 1),
        ),
    ),
    "flux2": Family(
        _flux2,
        (
            ("double_blocks.0.txt_attn.qkv.weight", 3),
            ("double_blocks.1.img_mlp.0.weight", 1),
            ("single_blocks.0.linear1.weight", 1),  # diffusers' to_qkv_mlp_proj is fused itself
            ("single_blocks.1.linear2.weight", 1),
        ),
    ),
    "z_image": Family(
        _z_image,
        (
            ("layers.0.attention.qkv.weight", 3),
            ("layers.1.feed_forward.w1.weight", 1),
            ("layers.0.attention.out.weight", 1),
            ("layers.1.feed_forward.w2.weight", 1),
        ),
        frozenset({"kohya", "diffusers"}),  # kohya (musubi-tuner) names Z-Image's diffusers paths
    ),
    "lumina2": Family(  # 3 query heads to 1 key/value head: qkv's row blocks are 3:1:1
        _lumina2,
        (
            (LUMINA + "layers.0.attention.qkv.weight", 3),
            (LUMINA + "noise_refiner.0.feed_forward.w2.weight", 1),
            (LUMINA + "context_refiner.1.attention.out.weight", 1),
            (LUMINA + "layers.1.adaLN_modulation.1.weight", 1),
        ),
    ),
    "hidream": Family(  # nothing fused; a routed expert among the planted weights
        _hidream,
        (
            ("double_stream_blocks.0.block.attn1.to_q.weight", 1),
            ("double_stream_blocks.1.block.ff_i.experts.0.w1.weight", 1),
            ("single_stream_blocks.0.block.adaLN_modulation.1.weight", 1),
            ("double_stream_blocks.0.block.attn1.to_k_t.weight", 1),
        ),
    ),
    "anima": Family(  # nothing fused; the text conditioner (no default target) must come through untouched
        _anima,
        (
            ("net.blocks.0.self_attn.q_proj.weight", 1),
            ("net.blocks.1.cross_attn.k_proj.weight", 1),
            ("net.blocks.0.mlp.layer1.weight", 1),
            ("net.blocks.1.self_attn.output_proj.weight", 1),
        ),
    ),
    wan_test.I2V: Family(  # nothing fused; an image cross-attention key among the planted weights
        _wan,
        (
            ("blocks.0.self_attn.q.weight", 1),
            ("blocks.1.ffn.0.weight", 1),
            ("blocks.0.cross_attn.k_img.weight", 1),
            ("blocks.1.cross_attn.o.weight", 1),
        ),
    ),
    "hunyuan_video": Family(  # each planted name, flattened (kohya) or in diffusers, is Flux.1's too
        _hunyuan_video,
        (
            ("double_blocks.0.img_attn_qkv.weight", 3),
            ("double_blocks.1.txt_attn_proj.weight", 1),
            ("single_blocks.1.linear1.weight", 4),
            ("single_blocks.0.linear2.weight", 1),
        ),
    ),
    "ltx_video": Family(  # nothing fused
        _ltx_video,
        (
            (LTXV + "transformer_blocks.0.attn1.to_q.weight", 1),
            (LTXV + "transformer_blocks.1.ff.net.0.proj.weight", 1),
            (LTXV + "transformer_blocks.0.attn2.to_k.weight", 1),
            (LTXV + "transformer_blocks.1.attn1.to_out.0.weight", 1),
        ),
    ),
    "ltx2": Family(  # nothing fused; the audio stream and the cross-modal attentions (not square) planted too
        _ltx2,
        (
            (LTX2 + "transformer_blocks.0.audio_to_video_attn.to_q.weight", 1),
            (LTX2 + "transformer_blocks.1.audio_ff.net.0.proj.weight", 1),
            (LTX2 + "transformer_blocks.0.attn1.to_v.weight", 1),
            (LTX2 + "transformer_blocks.1.video_to_audio_attn.to_k.weight", 1),
        ),
    ),
    # the video stream alone: its names (and widths' ratios) are LTX-Video's and Anima's too, and table
    # order reads them as those; extract names LTX-2 in metadata in every layout
    "ltx2-video": Family(
        _ltx2,
        (
            (LTX2 + "transformer_blocks.0.attn1.to_v.weight", 1),
            (LTX2 + "transformer_blocks.1.ff.net.0.proj.weight", 1),
            (LTX2 + "transformer_blocks.0.attn2.to_q.weight", 1),
            (LTX2 + "transformer_blocks.1.ff.net.2.weight", 1),
        ),
        arch="ltx2",
    ),
}


# -- the synthetic fine-tune --------------------------------------------------------------------------------------
def planted_change(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An exact rank-2 D (singular values 2:1) with ||D|| = CHANGE ||W||, in float64."""
    u = torch.linalg.qr(torch.randn(w.shape[0], RANK, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(w.shape[1], RANK, generator=g, dtype=torch.float64)).Q
    s = torch.tensor(PLANTED, dtype=torch.float64)
    return (u * (s * CHANGE * float(w.double().norm()) / float(s.norm()))) @ v.T


@dataclass
class Pair:
    name: str  # the key in FAMILIES
    arch: str  # the family
    base: Path
    tuned: Path
    base_sd: StateDict
    tuned_sd: StateDict
    planted: tuple[tuple[str, int], ...]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: a second torch thread only waits on the first on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pair(name: str, root: Path) -> Pair:
    family = FAMILIES[name]
    torch.manual_seed(0)
    with torch.no_grad():
        base = {k: v.detach().to(torch.float32).contiguous() for k, v in family.build().items()}
    g = torch.Generator().manual_seed(len(name))
    tuned = dict(base)
    for key, _ in family.planted:
        w = base[key]
        assert w.ndim == 2, key
        tuned[key] = (w.double() + planted_change(w, g)).to(w.dtype).contiguous()
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    base_path, tuned_path = root / "base.safetensors", root / "tuned.safetensors"
    return Pair(name, family.arch or name, base_path, tuned_path, base, tuned, family.planted)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Callable[[str], Pair]:
    """BASE and TUNED by family, each built once for the module, when a test first asks for it."""
    built: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in built:
            built[name] = make_pair(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


# -- checks -------------------------------------------------------------------------------------------------------
def merged_into_base(pair: Pair, lora: Path, dest: Path) -> StateDict:
    loratool.merge(pair.base, [lora], dest, device="cpu")
    merged = load_file(str(dest))
    assert merged.keys() == pair.base_sd.keys()
    return merged


def error_of(got: torch.Tensor, want: torch.Tensor, change: torch.Tensor) -> float:
    """||got - want|| relative to the planted change's norm."""
    return float((got.double() - want.double()).norm() / change.norm())


def assert_only_planted_changed(pair: Pair, merged: StateDict) -> None:
    planted = {key for key, _ in pair.planted}
    changed = sorted(k for k, v in merged.items() if k not in planted and not torch.equal(v, pair.base_sd[k]))
    assert changed == [], f"not planted, yet the merge changed: {changed[:8]}"


def count_modules(pair: Pair, to: str) -> int:
    """The modules extract writes: a fused weight as one, or one per row block where the layout splits it."""
    split = to in FAMILIES[pair.name].split_in
    return sum(parts if split else 1 for _, parts in pair.planted)


def extracted(pair: Pair, to: str, tmp_path: Path) -> tuple[loratool.ExtractReport, Path]:
    lora = tmp_path / "lora.safetensors"
    return loratool.extract(pair.base, pair.tuned, lora, rank=RANK, to=to, device="cpu"), lora


CASES = [pytest.param(name, to, id=f"{name}-{to}") for name in FAMILIES for to in LAYOUTS]


@pytest.mark.parametrize(("family", "to"), CASES)
def test_extract_and_resize_outputs_are_read_as_the_family(family: str, to: str, pairs, tmp_path: Path) -> None:
    pair = pairs(family)
    report, lora = extracted(pair, to, tmp_path)
    assert report.architecture == pair.arch
    small = tmp_path / "rank1.safetensors"
    loratool.resize(lora, small, rank=1, device="cpu")
    for path in (lora, small):
        inspected = loratool.inspect(path)
        assert inspected.architecture == pair.arch, inspected.architecture_reason
        assert not [f for f in inspected.findings if f.severity == "error"], inspected.findings


@pytest.mark.parametrize(("family", "to"), CASES)
def test_extract_merges_back_to_tuned_and_resize_keeps_the_best_rank1(
    family: str, to: str, pairs, tmp_path: Path
) -> None:
    pair = pairs(family)
    # 1. extract at the planted rank: exactly the changed modules, each exact; the unchanged ones skipped
    report, lora = extracted(pair, to, tmp_path)
    modules = count_modules(pair, to)
    assert report.target == to
    assert len(report.modules) == modules and {m.rank for m in report.modules} == {RANK}
    assert all(m.relative_error < RTOL for m in report.modules), report.modules
    assert report.skipped and {m.change for m in report.skipped} == {0.0}
    assert [m.rank for m in loratool.inspect(lora).modules] == [RANK] * modules

    # 2. merged back into BASE: TUNED on the planted weights, BASE bit for bit everywhere else
    merged = merged_into_base(pair, lora, tmp_path / "merged.safetensors")
    for key, _ in pair.planted:
        change = pair.tuned_sd[key].double() - pair.base_sd[key].double()
        assert error_of(merged[key], pair.tuned_sd[key], change) < RTOL, key
    assert_only_planted_changed(pair, merged)

    # 3. resized to rank 1: rank 1 everywhere; merged, the best rank-1 approximation of the change
    small = tmp_path / "rank1.safetensors"
    loratool.resize(lora, small, rank=1, device="cpu")
    assert [m.rank for m in loratool.inspect(small).modules] == [1] * modules
    merged = merged_into_base(pair, small, tmp_path / "merged_rank1.safetensors")
    for key, _ in pair.planted:  # within the whole weight's optimum (a row block cut alone does no worse)
        change = pair.tuned_sd[key].double() - pair.base_sd[key].double()
        assert error_of(merged[key], pair.tuned_sd[key], change) < BEST_RANK1 + RTOL, key
    key = pair.planted[1][0]  # an unfused weight: exactly the SVD's rank-1 truncation
    change = pair.tuned_sd[key].double() - pair.base_sd[key].double()
    u, s, vh = torch.linalg.svd(change)
    best = pair.base_sd[key].double() + s[0] * torch.outer(u[:, 0], vh[0])
    assert error_of(merged[key], best, change) < RTOL, key
    assert error_of(merged[key], pair.tuned_sd[key], change) == pytest.approx(BEST_RANK1, rel=1e-3)
    assert_only_planted_changed(pair, merged)
