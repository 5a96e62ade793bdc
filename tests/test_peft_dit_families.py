"""convert to PEFT on every DiT family with a table, checked with PEFT itself on the tiny models.

For each family, the tiny diffusers transformer of its family test (its `TINY` config and LoRA targets,
imported from there) gets a LoRA diffusers saves (`dit_oracle.tiny_dit`: rank 4, alpha 6, `proj_out` at
rank 2). What the file proves:

- `convert(that LoRA, "peft", DIR)` writes a PEFT adapter folder (adapter_config.json and
  adapter_model.safetensors).
- `PeftModel.from_pretrained` on a fresh copy of the tiny transformer (the base weights) loads every
  tensor of the folder, none missing and none unexpected (the adapter's state dict in the model is the
  file's, key for key and value for value), and `merge_and_unload()` gives diffusers' own fused weights
  (`fuse_lora`) within rtol 1e-5 / atol 1e-6, every weight of the model.
- `inspect(DIR)` reads the folder as the family.
- DiffSynth-Studio's layout (our ComfyUI output without `diffusion_model.`, `lora_A.default.weight` /
  `lora_B.default.weight`, alpha / rank folded into A) is read as the family, as the same LoRA, and
  converts back to diffusers as the same LoRA.

Anima is its transformer alone here (its family test adds the text conditioner); LTX-2 is `ltx2`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from deltas import deltas
from dit_oracle import TinyDiT, tiny_dit
from safetensors.torch import load_file, save_file

import loratool

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import test_family_anima as anima_test  # noqa: E402
import test_family_chroma as chroma_test  # noqa: E402
import test_family_flux2 as flux2_test  # noqa: E402
import test_family_hidream as hidream_test  # noqa: E402
import test_family_hunyuan_video as hunyuan_test  # noqa: E402
import test_family_krea2 as krea2_test  # noqa: E402
import test_family_ltx2 as ltx2_test  # noqa: E402
import test_family_ltx_video as ltx_video_test  # noqa: E402
import test_family_lumina2 as lumina2_test  # noqa: E402
import test_family_qwen_image as qwen_test  # noqa: E402
import test_family_qwen_image21 as qwen21_test  # noqa: E402
import test_family_sd3 as sd3_test  # noqa: E402
import test_family_wan as wan_test  # noqa: E402
import test_family_z_image as z_image_test  # noqa: E402
from diffusers import (  # noqa: E402
    ChromaTransformer2DModel,
    CosmosTransformer3DModel,
    Flux2Transformer2DModel,
    HiDreamImageTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    Krea2Transformer2DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    Lumina2Transformer2DModel,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from diffusers.loaders.lora_pipeline import (  # noqa: E402
    Flux2LoraLoaderMixin,
    FluxLoraLoaderMixin,
    HiDreamImageLoraLoaderMixin,
    HunyuanVideoLoraLoaderMixin,
    Krea2LoraLoaderMixin,
    LTX2LoraLoaderMixin,
    LTXVideoLoraLoaderMixin,
    Lumina2LoraLoaderMixin,
    QwenImageLoraLoaderMixin,
    SD3LoraLoaderMixin,
    WanLoraLoaderMixin,
    ZImageLoraLoaderMixin,
)
from peft import PeftModel  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


class AnimaTransformerLoraWriter(anima_test.AnimaLoraWriter):
    """`tiny_dit` saves with the keywords every other mixin's `save_lora_weights` takes."""

    @classmethod
    def save_lora_weights(cls, save_directory, transformer_lora_layers, transformer_lora_adapter_metadata) -> None:
        super().save_lora_weights(
            save_directory, {"transformer": transformer_lora_layers}, {"transformer": transformer_lora_adapter_metadata}
        )


# -- the tiny models and their LoRA targets, as each family test makes them ---------------------------------------
@dataclass(frozen=True)
class Family:
    model: Callable[[], torch.nn.Module]  # the tiny transformer, freshly initialized
    pipeline: str
    loader: type
    targets: Callable[[torch.nn.Module], list[str]]


def _blocks(prefix: str, layers: int, names: list[str]) -> list[str]:
    return [f"{prefix}.{i}.{t}" for i in range(layers) for t in names]


def _sd3_targets(_: torch.nn.Module) -> list[str]:
    last = sd3_test.TINY["num_layers"] - 1  # the family test leaves the last block out (swapped text halves)
    targets = [
        f"transformer_blocks.{i}.{t}"
        for i in range(last)
        for t in sd3_test.LORA_TARGETS
        if t not in ("norm_out.linear", "proj_out") and (not t.startswith("attn2.") or i == 0)
    ]
    return [*targets, "norm_out.linear", "proj_out"]


def _krea2() -> torch.nn.Module:
    model = Krea2Transformer2DModel(**krea2_test.TINY)
    with torch.no_grad():  # as the family test: distinct norms and modulation tables
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("scale_shift_table"):
                param.copy_(torch.randn_like(param))
    return model


def _lumina2_targets(_: torch.nn.Module) -> list[str]:
    tiny, attn_ff = lumina2_test.TINY, lumina2_test.ATTN_FF
    targets = _blocks("layers", tiny["num_layers"], [*attn_ff, "norm1.linear"])
    targets += _blocks("noise_refiner", tiny["num_refiner_layers"], [*attn_ff, "norm1.linear"])
    targets += _blocks("context_refiner", tiny["num_refiner_layers"], attn_ff)
    return targets + lumina2_test.TOP_TARGETS


def _hidream_targets(_: torch.nn.Module) -> list[str]:
    targets = [
        f"{kind}_stream_blocks.{i}.block.{t}"
        for kind, names in (("double", hidream_test.DOUBLE_TARGETS), ("single", hidream_test.SINGLE_TARGETS))
        for i in range(2)
        for t in names
    ]
    return targets + hidream_test.TOP_TARGETS


def _hunyuan_targets(model: torch.nn.Module) -> list[str]:
    tiny = hunyuan_test.TINY
    names = _blocks("transformer_blocks", tiny["num_layers"], hunyuan_test.DOUBLE)
    names += _blocks("single_transformer_blocks", tiny["num_single_layers"], hunyuan_test.SINGLE)
    names += [f"context_embedder.token_refiner.refiner_blocks.0.{t}" for t in hunyuan_test.REFINER] + hunyuan_test.TOP
    return hunyuan_test.peft_targets(model, names)


LTX2 = ltx2_test.TINY["ltx2"]
FAMILIES = {
    "sd3.5-medium": Family(
        lambda: SD3Transformer2DModel(**sd3_test.TINY), "StableDiffusion3Pipeline", SD3LoraLoaderMixin, _sd3_targets
    ),
    "qwen_image": Family(
        lambda: QwenImageTransformer2DModel(**qwen_test.TINY),
        "QwenImagePipeline",
        QwenImageLoraLoaderMixin,
        lambda _: (
            _blocks("transformer_blocks", qwen_test.TINY["num_layers"], qwen_test.BLOCK_TARGETS) + qwen_test.TOP_TARGETS
        ),
    ),
    "chroma": Family(
        lambda: ChromaTransformer2DModel(**chroma_test.TINY),
        "ChromaPipeline",
        FluxLoraLoaderMixin,
        lambda _: (
            _blocks("transformer_blocks", 2, chroma_test.DOUBLE)
            + _blocks("single_transformer_blocks", 2, chroma_test.SINGLE)
            + chroma_test.TOP
        ),
    ),
    "flux2": Family(
        lambda: Flux2Transformer2DModel(**flux2_test.TINY),
        "Flux2Pipeline",
        Flux2LoraLoaderMixin,
        lambda _: (
            _blocks("transformer_blocks", flux2_test.TINY["num_layers"], flux2_test.DOUBLE_TARGETS)
            + _blocks("single_transformer_blocks", flux2_test.TINY["num_single_layers"], flux2_test.SINGLE_TARGETS)
            + flux2_test.TOP_TARGETS
        ),
    ),
    "z_image": Family(
        lambda: ZImageTransformer2DModel(**z_image_test.TINY),
        "ZImagePipeline",
        ZImageLoraLoaderMixin,
        lambda _: (
            _blocks("layers", z_image_test.TINY["n_layers"], z_image_test.BLOCK_TARGETS) + z_image_test.OTHER_TARGETS
        ),
    ),
    "lumina2": Family(
        lambda: Lumina2Transformer2DModel(**lumina2_test.TINY),
        "Lumina2Pipeline",
        Lumina2LoraLoaderMixin,
        _lumina2_targets,
    ),
    "hidream": Family(
        lambda: HiDreamImageTransformer2DModel(**hidream_test.TINY),
        "HiDreamImagePipeline",
        HiDreamImageLoraLoaderMixin,
        _hidream_targets,
    ),
    "anima": Family(
        lambda: CosmosTransformer3DModel(**anima_test.TINY),
        "AnimaModularPipeline",
        AnimaTransformerLoraWriter,
        lambda _: (
            _blocks("transformer_blocks", anima_test.TINY["num_layers"], anima_test.BLOCK_TARGETS)
            + anima_test.TOP_TARGETS
        ),
    ),
    "qwen_image21": Family(
        lambda: QwenImage21Transformer2DModel(**qwen21_test.TINY),
        "QwenImage21Pipeline",
        QwenImageLoraLoaderMixin,
        lambda _: list(qwen21_test.TARGETS),
    ),
    "krea2": Family(
        _krea2,
        "Krea2Pipeline",
        Krea2LoraLoaderMixin,
        lambda _: (
            _blocks("transformer_blocks", krea2_test.TINY["num_layers"], krea2_test.BLOCK_TARGETS)
            + krea2_test.OTHER_TARGETS
        ),
    ),
    "wan2.1-i2v-14b": Family(
        lambda: WanTransformer3DModel(**wan_test.TINY),
        "WanImageToVideoPipeline",
        WanLoraLoaderMixin,
        lambda _: _blocks("blocks", wan_test.TINY["num_layers"], wan_test.BLOCK_TARGETS) + wan_test.TOP_TARGETS,
    ),
    "hunyuan_video": Family(
        lambda: HunyuanVideoTransformer3DModel(**hunyuan_test.TINY),
        "HunyuanVideoPipeline",
        HunyuanVideoLoraLoaderMixin,
        _hunyuan_targets,
    ),
    "ltx_video": Family(
        lambda: LTXVideoTransformer3DModel(**ltx_video_test.TINY),
        "LTXPipeline",
        LTXVideoLoraLoaderMixin,
        lambda _: (
            _blocks("transformer_blocks", ltx_video_test.TINY["num_layers"], ltx_video_test.BLOCK_TARGETS)
            + ltx_video_test.TOP_TARGETS
        ),
    ),
    "ltx2": Family(
        lambda: LTX2VideoTransformer3DModel(**LTX2),
        "LTX2Pipeline",
        LTX2LoraLoaderMixin,
        lambda _: (
            _blocks("transformer_blocks", LTX2["num_layers"], ltx2_test.BLOCK_TARGETS)
            + ltx2_test.TOP_TARGETS
            + ltx2_test.OWN_TARGETS["ltx2"]
        ),
    ),
}


# -- built once per family for the module, when a test first asks ---------------------------------------------
@dataclass
class Built:
    name: str
    dit: TinyDiT
    peft_dir: Path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: a second torch thread only waits on the first on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, root: Path) -> Built:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.model()
    with warnings.catch_warnings():  # tiny_dit's proj_out rank, where a family has no proj_out
        warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
        dit = tiny_dit(root, model, family.pipeline, family.loader, family.targets(model))
    loratool.convert(dit.lora, "peft", root / "peft")
    return Built(name, dit, root / "peft")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Callable[[str], Built]:
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def fresh_base(built: Built) -> torch.nn.Module:
    """A new tiny transformer holding the base weights (the one tiny_dit fused into is spent)."""
    model = FAMILIES[built.name].model()
    model.load_state_dict(built.dit.before)
    return model.eval()


CASES = [pytest.param(name, id=name) for name in FAMILIES]


@pytest.mark.parametrize("family", CASES)
def test_convert_writes_a_peft_folder(family: str, built) -> None:
    out = built(family).peft_dir
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]
    config = json.loads((out / CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    tensors = load_file(str(out / WEIGHTS))
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert len(modules) == len(built(family).dit.targets)  # hunyuan_video's list is PEFT's own expansion


@pytest.mark.parametrize("family", CASES)
def test_peft_loads_every_key_and_merges_to_diffusers_fused_weights(family: str, built) -> None:
    b = built(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(fresh_base(b), b.peft_dir)
    assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    saved = load_file(str(b.peft_dir / WEIGHTS))
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(saved)  # none missing, none unexpected
    assert not [k for k, v in saved.items() if not torch.equal(loaded[k], v)]

    merged = model.merge_and_unload().state_dict()
    fused = b.dit.fused
    assert sorted(merged) == sorted(fused)
    off = [k for k, v in fused.items() if not torch.allclose(merged[k], v, rtol=RTOL, atol=ATOL)]
    assert off == [], off[:8]
    changed = {k for k, v in b.dit.before.items() if not torch.equal(fused[k], v)}
    assert changed == {t + ".weight" for t in b.dit.targets}  # the oracle moved every target, nothing else


@pytest.mark.parametrize("family", CASES)
def test_inspect_reads_the_peft_folder_as_the_family(family: str, built) -> None:
    b = built(family)
    report = loratool.inspect(b.peft_dir)
    assert report.architecture == family, report.architecture_reason
    assert len(report.modules) == len(load_file(str(b.peft_dir / WEIGHTS))) // 2
    assert not [f for f in report.findings if f.severity == "error"], report.findings


@pytest.mark.parametrize("family", FAMILIES)
def test_diffsynth_layout_reads_as_the_same_lora(family: str, built, tmp_path) -> None:
    """DiffSynth-Studio: single-file names with no prefix, PEFT's adapter name in the key, no alpha
    (scale 1). Made from our ComfyUI output, alpha / rank folded into A; it reads (and converts back to
    diffusers) as the same LoRA. A fused single-file weight (qkv, linear1) also holds its untargeted
    parts, whose deltas are exactly zero: the only keys allowed beyond the original's."""
    lora = built(family).dit.lora
    comfy = tmp_path / "comfy.safetensors"
    loratool.convert(lora, "comfyui", comfy)
    tensors = {
        k[len("diffusion_model.") :]: v for k, v in load_file(str(comfy)).items() if k.startswith("diffusion_model.")
    }
    diffsynth = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            module = key.removesuffix(".lora_down.weight")
            diffsynth[module + ".lora_A.default.weight"] = down * (tensors[module + ".alpha"].item() / down.shape[0])
            diffsynth[module + ".lora_B.default.weight"] = tensors[module + ".lora_up.weight"]
    assert len(diffsynth) * 3 == 2 * len(tensors)  # every module: down, up, alpha
    path = tmp_path / "diffsynth.safetensors"
    save_file(diffsynth, str(path))
    report = loratool.inspect(path)
    assert (report.format, report.architecture) == ("diffsynth", family), report.architecture_reason
    assert {m.scale for m in report.modules} == {1.0}
    back = tmp_path / "back.safetensors"
    loratool.convert(path, "diffusers", back)
    want = deltas(lora)
    for got in (deltas(path), deltas(back)):
        assert set(want) <= set(got)
        assert not [k for k in set(got) - set(want) if got[k].any()]
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
