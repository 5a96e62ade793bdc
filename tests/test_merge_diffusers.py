"""merge on narrow single-file checkpoints, checked against diffusers itself, offline, on the tiny models.

What it proves:

- SD1.5 (LDM keys: UNet and CLIP-L) and SDXL (sgm UNet, CLIP-L, OpenCLIP bigG whose q/k/v are row blocks
  of one `in_proj_weight`): the kohya fixtures merged by `loratool.merge`, turned into diffusers and
  transformers weights by diffusers' own single-file converters, equal the very tiny models the base was
  built from with the LoRA loaded by diffusers and fused (`fuse_lora`), to fp32 rounding; everything the
  LoRA does not target is unchanged.
- Flux (BFL keys, fused `qkv` and `linear1`, bare or under `model.diffusion_model.`): the kohya fixture
  (fused modules) and diffusers' own Flux fixture (split to_q/to_k/to_v and proj_mlp, landing in row blocks
  of the fused weights) likewise. The kohya file's CLIP-L modules are a MergeError on a transformer-only
  base by default, and reported unmatched with allow_unmatched=True.
- The output mirrors the base: same keys, file order, dtypes, shapes and metadata; untouched tensors byte
  for byte. fp8 weights (e4m3fn, e5m2) are upcast, updated in fp32 and cast back once.
- Shapes come from the base (the narrow widths here are not the tables' full-size ones): a base of the wrong
  width is a MergeError naming the module, a result beyond fp16's range a MergeError naming the tensor;
  neither leaves anything at DEST, nor touches an existing DEST replaced with force=True.

Where diffusers' own kohya loading is known to be wrong (SD1.5 per-module attention alphas; Flux `linear1`
with full-size widths hard-coded), the reference loads our diffusers conversion of the fixture instead
(`loratool.convert(src, "diffusers", dest)`, checked exact in test_convert_diffusers.py). diffusers' Flux
single-file converter hard-codes the full-size `linear1` split too (3 x 3072 + 12288 rows): it gets an empty
stand-in of that size, and our output's `linear1` is split at the tiny model's own widths (from its config).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import clip_config, clip_text_model, flux_transformer, sd15_unet, sdxl_unet, single_file
from torch import nn

import loratool
from loratool.archs import get_architecture
from loratool.archs.table import Architecture
from loratool.errors import MergeError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers.loaders.lora_base import fuse_text_encoder_lora  # noqa: E402
from diffusers.loaders.lora_pipeline import (  # noqa: E402
    FluxLoraLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from transformers import CLIPTextModelWithProjection  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text(encoding="utf-8"))["fixtures"]
BASE_METADATA = {"format": "pt", "modelspec.title": "tiny merge base"}
BFL_PREFIX = "model.diffusion_model."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
RTOL, ATOL = 1e-5, 1e-6
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

StateDict = dict[str, torch.Tensor]


# -- bases ----------------------------------------------------------------------------------------------------
def swap_halves(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def base_checkpoint(arch: Architecture, models: dict[str, nn.Module], dtype: torch.dtype = torch.float32) -> StateDict:
    """A single-file checkpoint of the tiny models: test_inspect_base's weights, plus every bias (OpenCLIP
    `in_proj_bias`, Flux fused biases) and, for Flux, the q/k RMSNorm scales, so diffusers' converters see
    a complete model; rows the single-file layout stores with swapped halves (Flux final modulation) swapped."""
    sd = single_file(arch, models, dtype)
    states = {c: m.state_dict() for c, m in models.items()}

    def param(canonical: str, suffix: str) -> torch.Tensor | None:
        spec = arch.modules[canonical]
        own = states[spec.component]
        for path in (spec.path, spec.path.removeprefix("text_model.")):
            if path + suffix in own:
                return own[path + suffix].detach().to(dtype)
        return None

    for spec in arch.modules.values():
        if spec.component not in models or spec.native is None:
            continue
        prefix = arch.components[spec.component].file_prefixes[0]
        bias = param(spec.name, ".bias")
        if spec.rows == "swap_halves" and prefix + spec.native_weight in sd:  # narrow models may lack it
            sd[prefix + spec.native_weight] = swap_halves(sd[prefix + spec.native_weight]).contiguous()
            bias = None if bias is None else swap_halves(bias)
        if bias is not None and spec.weight is None:
            sd[prefix + spec.native + ".bias"] = bias.contiguous()
    for group in arch.fused.values():
        if group.component not in models:
            continue
        biases = [param(p, ".bias") for p in group.parts]
        if all(b is not None for b in biases):
            prefix = arch.components[group.component].file_prefixes[0]
            sd[prefix + group.weight.removesuffix("weight") + "bias"] = torch.cat(biases)
    if arch.name == "flux1" and "transformer" in models:  # Flux q/k RMSNorm scales: parameters, not modules
        flux = models["transformer"]
        norms = {}  # BFL norm -> diffusers (query, key) RMSNorms
        for i in range(len(flux.transformer_blocks)):
            attn = f"transformer_blocks.{i}.attn"
            norms[f"double_blocks.{i}.img_attn.norm"] = (f"{attn}.norm_q", f"{attn}.norm_k")
            norms[f"double_blocks.{i}.txt_attn.norm"] = (f"{attn}.norm_added_q", f"{attn}.norm_added_k")
        for i in range(len(flux.single_transformer_blocks)):
            attn = f"single_transformer_blocks.{i}.attn"
            norms[f"single_blocks.{i}.norm"] = (f"{attn}.norm_q", f"{attn}.norm_k")
        for native, (query, key) in norms.items():
            sd[f"{native}.query_norm.scale"] = states["transformer"][f"{query}.weight"]
            sd[f"{native}.key_norm.scale"] = states["transformer"][f"{key}.weight"]
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in sd.items()}


def save(sd: StateDict, path: Path) -> Path:
    save_file(sd, str(path), metadata=BASE_METADATA)
    return path


# -- references: the tiny models with the LoRA loaded by diffusers and fused ------------------------------------
def plain_weights(model: nn.Module) -> StateDict:
    """A (possibly PEFT-wrapped, fused) model's parameters under their plain names, CLIP without `text_model.`."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        out[normal(key.replace(".base_layer.", "."))] = value.detach().clone()
    return out


def normal(key: str) -> str:
    return key.removeprefix("text_model.")


def fuse(model: nn.Module) -> int:
    """diffusers' fuse: `fuse_lora` on its own models, `fuse_text_encoder_lora` on transformers ones.
    Returns how many layers got a LoRA."""
    layers = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    if hasattr(model, "fuse_lora"):
        model.fuse_lora()
    else:
        fuse_text_encoder_lora(model)
    return layers


@dataclass
class Family:
    base: Path  # fp32 single file
    before: dict[str, StateDict]  # component -> the tiny model's weights (what the base holds)
    after: dict[str, dict[str, StateDict]]  # fixture -> component -> weights with the LoRA fused
    config: dict  # the UNet's / transformer's config


def load_into(loader: type, models: dict[str, nn.Module], state_dict: StateDict, alphas, metadata) -> None:
    for component, model in models.items():
        if component in ("unet", "transformer"):
            model.load_lora_adapter(state_dict, prefix=component, network_alphas=alphas, metadata=metadata)
        else:
            loader.load_lora_into_text_encoder(
                state_dict, network_alphas=alphas, text_encoder=model, prefix=component, metadata=metadata
            )


def fused_weights(models: dict[str, nn.Module], fixture: str) -> dict[str, StateDict]:
    out = {}
    for component, model in models.items():
        injected = fuse(model)
        assert injected == len(manifest_targets(fixture, component)), (fixture, component, injected)
        out[component] = plain_weights(model)
    return out


def manifest_targets(fixture: str, component: str) -> set[str]:
    """The fixture's target modules in `component`, as weight keys of the diffusers/transformers model."""
    targets = {t for m in MANIFEST[fixture]["modules"].values() for t in m["targets"]}
    return {normal(t[len(component) + 1 :]) + ".weight" for t in targets if t.startswith(component + ".")}


def via_our_diffusers_file(fixture: str, tmp: Path) -> Path:
    return via_our_diffusers_file_at(FIXTURES / fixture, tmp)


def via_our_diffusers_file_at(src: Path, tmp: Path) -> Path:
    dest = tmp / f"{src.stem}.diffusers.safetensors"
    loratool.convert(src, "diffusers", dest)
    return dest


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Family:
    tmp = tmp_path_factory.mktemp("sd1")
    models = {"unet": sd15_unet(), "text_encoder": clip_text_model()}
    base = save(base_checkpoint(get_architecture("sd1"), models), tmp / "sd1.safetensors")
    before = {c: plain_weights(m) for c, m in models.items()}
    # diffusers' kohya SD1.5 loader gives 17 of these modules scale 1 instead of alpha / r (per-module alphas)
    path = via_our_diffusers_file("kohya_sd15.safetensors", tmp)
    state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    assert alphas is None and metadata
    load_into(StableDiffusionLoraLoaderMixin, models, state_dict, None, metadata)
    after = {"kohya_sd15.safetensors": fused_weights(models, "kohya_sd15.safetensors")}
    return Family(base, before, after, dict(models["unet"].config))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Family:
    tmp = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(1)
    models = {
        "unet": sdxl_unet(),
        "text_encoder": clip_text_model(),
        "text_encoder_2": CLIPTextModelWithProjection(clip_config()),
    }
    base = save(base_checkpoint(get_architecture("sdxl"), models), tmp / "sdxl.safetensors")
    before = {c: plain_weights(m) for c, m in models.items()}
    # diffusers' own kohya SDXL conversion (sgm names), right for this fixture (test_convert_diffusers.py)
    kohya = load_file(str(FIXTURES / "kohya_sdxl.safetensors"))
    state_dict, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        kohya, unet_config=SimpleNamespace(layers_per_block=models["unet"].config.layers_per_block)
    )
    load_into(StableDiffusionXLLoraLoaderMixin, models, state_dict, alphas, None)
    after = {"kohya_sdxl.safetensors": fused_weights(models, "kohya_sdxl.safetensors")}
    return Family(base, before, after, dict(models["unet"].config))


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Family:
    tmp = tmp_path_factory.mktemp("flux")
    transformer = flux_transformer()
    base = save(base_checkpoint(get_architecture("flux1"), {"transformer": transformer}), tmp / "flux.safetensors")
    before = {"transformer": plain_weights(transformer)}
    after = {}
    # kohya: diffusers' own kohya Flux loader splits linear1 at full-size widths; load our conversion instead
    path = via_our_diffusers_file("kohya_flux.safetensors", tmp)
    for fixture, source in (("kohya_flux.safetensors", path), ("flux_diffusers.safetensors", None)):
        model = copy.deepcopy(transformer)
        state_dict, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
            str(source or FIXTURES / fixture), return_alphas=True, return_lora_metadata=True
        )
        assert not alphas
        load_into(FluxLoraLoaderMixin, {"transformer": model}, state_dict, None, metadata)
        after[fixture] = fused_weights({"transformer": model}, fixture)
    return Family(base, before, after, dict(transformer.config))


# -- diffusers' single-file converters on our output ----------------------------------------------------------
def sd_components(sd: StateDict, family: str, config: dict) -> dict[str, StateDict]:
    out = {"unet": convert_ldm_unet_checkpoint(dict(sd), config)}
    clip = convert_ldm_clip_checkpoint(dict(sd))
    out["text_encoder"] = clip
    if family == "sdxl":
        text_model = SimpleNamespace(config=clip_config())
        out["text_encoder_2"] = convert_open_clip_checkpoint(text_model, dict(sd), prefix=SDXL_TE2_PREFIX)
    return {c: {normal(k): v for k, v in weights.items()} for c, weights in out.items()}


def flux_components(sd: StateDict, config: dict) -> dict[str, StateDict]:
    """convert_flux_transformer_checkpoint_to_diffusers, with `linear1` split at the tiny model's widths: the
    converter splits it at (3072, 3072, 3072, 12288) whatever the checkpoint holds, so it gets an empty
    stand-in of that height (no columns) and its four outputs are replaced here."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    widths = (inner, inner, inner, 4 * inner)  # FluxSingleTransformerBlock's mlp_ratio is 4
    full = 3 * 3072 + 4 * 3072
    sd = {k.removeprefix(BFL_PREFIX): v for k, v in sd.items()}
    linear1 = {k: sd[k] for k in sd if ".linear1." in k}
    stand_in = {k: torch.empty(full, 0) if k.endswith("weight") else torch.empty(full) for k in linear1}
    out = convert_flux_transformer_checkpoint_to_diffusers({**sd, **stand_in})
    for key, value in linear1.items():
        i, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        block = f"single_transformer_blocks.{i}"
        parts = (f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp")
        assert value.shape[0] == sum(widths), key
        for part, piece in zip(parts, torch.split(value, widths), strict=True):
            out[f"{part}.{kind}"] = piece
    return {"transformer": out}


def components(sd: StateDict, family: str, config: dict) -> dict[str, StateDict]:
    return flux_components(sd, config) if family == "flux" else sd_components(sd, family, config)


def assert_equals_reference(
    merged: dict[str, StateDict], base: dict[str, StateDict], family: Family, fixture: str
) -> None:
    """Per component: the converted base is the tiny model; the converted merge is the fused model, and it
    differs from the base in exactly the fixture's target modules."""
    for component, got in merged.items():
        want, original = family.after[fixture][component], family.before[component]
        assert got.keys() == base[component].keys()
        assert set(got) <= set(want), sorted(set(got) - set(want))[:5]
        if component == "transformer":  # Flux: the converter gives the whole model
            assert set(got) == set(want)
        else:  # the single-file tables list linear, conv and embedding weights; the rest are norms
            assert all(re.search(r"norm|position_embedding", k) for k in set(want) - set(got))
        for key in got:
            torch.testing.assert_close(base[component][key], original[key], rtol=0, atol=0)
        changed = {k for k in got if not torch.equal(got[k], base[component][k])}
        assert changed == manifest_targets(fixture, component), component
        assert changed == {k for k in got if not torch.equal(want[k], original[k])}, component
        for key in sorted(got):
            torch.testing.assert_close(
                got[key], want[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key, c=component: f"{c}.{k}: {m}"
            )


# -- the output's layout, byte for byte ----------------------------------------------------------------------
def read_raw(path: Path) -> tuple[dict[str, str], list[tuple[str, str, list[int]]], dict[str, bytes]]:
    """(metadata, [(key, dtype, shape)] in data order, {key: raw bytes}) straight from the file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    metadata = header.pop("__metadata__", {})
    body = data[8 + n :]
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    layout = [(k, header[k]["dtype"], header[k]["shape"]) for k in order]
    raw = {k: body[slice(*header[k]["data_offsets"])] for k in order}
    return metadata, layout, raw


def assert_mirrors_base(base: Path, dest: Path, report) -> set[str]:
    """Same metadata, keys, order, dtypes and shapes; every tensor not updated is byte-identical.
    Returns the keys whose bytes changed (all updated: none of these merges rounds an update away)."""
    meta_b, layout_b, raw_b = read_raw(base)
    meta_d, layout_d, raw_d = read_raw(dest)
    assert meta_d == meta_b
    assert layout_d == layout_b
    changed = {k for k in raw_b if raw_b[k] != raw_d[k]}
    assert changed
    assert report.tensors_updated == len(changed)
    assert report.tensors_copied == len(raw_b) - len(changed)
    return changed


def merge(base: Path, fixtures: list[str], dest: Path, **kwargs):
    return merge_paths(base, [FIXTURES / f for f in fixtures], dest, **kwargs)


def merge_paths(base: Path, loras: list[Path], dest: Path, **kwargs):
    return loratool.merge(base, loras, dest, device="cpu", **kwargs)


# -- 1, 2. SD1.5 and SDXL ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "fixture"), [("sd1", "kohya_sd15.safetensors"), ("sdxl", "kohya_sdxl.safetensors")])
def test_sd_kohya_merge_equals_diffusers_fuse(request, tmp_path, family, fixture):
    fam: Family = request.getfixturevalue(family)
    dest = tmp_path / "merged.safetensors"
    report = merge(fam.base, [fixture], dest)
    (lora,) = report.loras
    assert (lora.matched, lora.unmatched) == (len(MANIFEST[fixture]["modules"]), [])
    changed = assert_mirrors_base(fam.base, dest, report)
    base_sd = load_file(str(fam.base))
    merged = components(load_file(str(dest)), family, fam.config)
    assert_equals_reference(merged, components(base_sd, family, fam.config), fam, fixture)
    if family == "sdxl":  # te2's q/k/v all landed in the fused OpenCLIP weights, nothing in a separate tensor
        in_proj = {k for k in changed if k.startswith(SDXL_TE2_PREFIX) and k.endswith(".attn.in_proj_weight")}
        assert len(in_proj) == 2
        assert not any(k.startswith(SDXL_TE2_PREFIX) and k.endswith("bias") for k in changed)


def test_sdxl_te2_rows_land_in_their_in_proj_block(sdxl, tmp_path):
    """Each of q/k/v updates only its own third of in_proj_weight (checked without any converter)."""
    dest = tmp_path / "merged.safetensors"
    merge(sdxl.base, ["kohya_sdxl.safetensors"], dest)
    base, out = load_file(str(sdxl.base)), load_file(str(dest))
    want = sdxl.after["kohya_sdxl.safetensors"]["text_encoder_2"]
    for layer in (0, 1):
        key = f"{SDXL_TE2_PREFIX}transformer.resblocks.{layer}.attn.in_proj_weight"
        d = base[key].shape[1]
        assert base[key].shape[0] == 3 * d
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(i * d, (i + 1) * d)
            torch.testing.assert_close(
                out[key][rows], want[f"encoder.layers.{layer}.self_attn.{part}.weight"], rtol=RTOL, atol=ATOL
            )


# -- 3. Flux ----------------------------------------------------------------------------------------------------
def prefixed(base: Path, tmp_path: Path) -> Path:
    return save({BFL_PREFIX + k: v for k, v in load_file(str(base)).items()}, tmp_path / "prefixed.safetensors")


@pytest.mark.parametrize("prefix", ["", BFL_PREFIX], ids=["bare", "model.diffusion_model"])
@pytest.mark.parametrize("fixture", ["kohya_flux.safetensors", "flux_diffusers.safetensors"])
def test_flux_merge_equals_diffusers_fuse(flux, tmp_path, fixture, prefix):
    base = prefixed(flux.base, tmp_path) if prefix else flux.base
    dest = tmp_path / "merged.safetensors"
    report = merge(base, [fixture], dest, allow_unmatched=fixture == "kohya_flux.safetensors")
    (lora,) = report.loras
    names = list(MANIFEST[fixture]["modules"])
    te1 = [n for n in names if n.startswith("lora_te1_")]
    assert len(te1) == (12 if fixture.startswith("kohya") else 0)
    assert sorted(lora.unmatched) == sorted(te1)
    assert lora.matched == len(names) - len(te1)
    changed = assert_mirrors_base(base, dest, report)
    assert all(k.startswith(prefix) for k in load_file(str(dest)))
    # fused qkv / linear1 were updated in place, never written as separate q/k/v weights
    fused = {k for k in changed if k.endswith(("_attn.qkv.weight", ".linear1.weight"))}
    assert len(fused) == 4 + 2
    merged = components(load_file(str(dest)), "flux", flux.config)
    assert_equals_reference(merged, components(load_file(str(base)), "flux", flux.config), flux, fixture)


def test_flux_final_modulation_halves_are_swapped_in_bfl_layout(flux, tmp_path):
    """`final_layer.adaLN_modulation.1` stores diffusers' norm_out.linear with its halves swapped: a kohya
    module (BFL rows) and a diffusers module (diffusers rows) both land right on a BFL base."""
    g = torch.Generator().manual_seed(11)
    rows, cols = flux.before["transformer"]["norm_out.linear.weight"].shape
    down, up = torch.randn(4, cols, generator=g) * 0.05, torch.randn(rows, 4, generator=g) * 0.05
    kohya = tmp_path / "kohya.safetensors"
    name = "lora_unet_final_layer_adaLN_modulation_1"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
        str(kohya),
        metadata={"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"},
    )
    peft = tmp_path / "diffusers.safetensors"
    save_file(
        {"transformer.norm_out.linear.lora_A.weight": down, "transformer.norm_out.linear.lora_B.weight": up},
        str(peft),
    )
    # diffusers loads its own layout as is; the kohya file through our diffusers conversion
    references = {kohya: via_our_diffusers_file_at(kohya, tmp_path), peft: peft}
    base = components(load_file(str(flux.base)), "flux", flux.config)["transformer"]
    for lora, loadable in references.items():
        model = flux_transformer()
        state_dict, _, metadata = FluxLoraLoaderMixin.lora_state_dict(
            str(loadable), return_alphas=True, return_lora_metadata=True
        )
        load_into(FluxLoraLoaderMixin, {"transformer": model}, state_dict, None, metadata)
        assert fuse(model) == 1
        want = plain_weights(model)
        dest = tmp_path / f"merged-{lora.stem}.safetensors"
        changed = assert_mirrors_base(flux.base, dest, merge_paths(flux.base, [lora], dest))
        assert changed == {"final_layer.adaLN_modulation.1.weight"}
        got = components(load_file(str(dest)), "flux", flux.config)["transformer"]
        assert not torch.equal(got["norm_out.linear.weight"], base["norm_out.linear.weight"])
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")


def test_flux_te_modules_on_a_transformer_only_base_need_allow_unmatched(flux, tmp_path):
    dest = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError) as info:
        merge(flux.base, ["kohya_flux.safetensors"], dest)
    named = re.findall(r"lora_te1_\w+", str(info.value))
    assert named and set(named) <= set(MANIFEST["kohya_flux.safetensors"]["modules"])
    assert not dest.exists() and list(tmp_path.iterdir()) == []


# -- 4. fp8 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3fn", "e5m2"])
def test_fp8_base_is_updated_in_fp32_and_cast_back_once(flux, tmp_path, fp8):
    """Weights in fp8, biases and norm scales in bf16 (as fp8 checkpoints store them). Each updated weight is
    exactly (W.float() + delta).to(fp8), where W.float() + delta is the fp32 merge of the same values
    (itself checked against diffusers here); everything else is copied byte for byte."""
    sd = load_file(str(flux.base))
    sd8 = {k: v.to(fp8 if k.endswith(".weight") else torch.bfloat16) for k, v in sd.items()}
    base8 = save(sd8, tmp_path / "base8.safetensors")
    base32 = save({k: v.float() for k, v in sd8.items()}, tmp_path / "base32.safetensors")
    fixture = "flux_diffusers.safetensors"
    out8, out32 = tmp_path / "out8.safetensors", tmp_path / "out32.safetensors"
    report = merge(base8, [fixture], out8)
    merge(base32, [fixture], out32)

    meta_b, layout_b, raw_b = read_raw(base8)
    meta_o, layout_o, raw_o = read_raw(out8)
    assert (meta_o, layout_o) == (meta_b, layout_b)
    merged8, merged32 = load_file(str(out8)), load_file(str(out32))
    updated = {k for k, v in load_file(str(base32)).items() if not torch.equal(merged32[k], v)}
    assert updated and all(k.endswith(".weight") for k in updated)
    assert report.tensors_updated == len(updated)
    assert report.tensors_copied == len(sd8) - len(updated)
    for key in raw_b:
        if key in updated:
            assert merged8[key].dtype == fp8
            want = merged32[key].to(fp8)
            assert merged8[key].view(torch.uint8).equal(want.view(torch.uint8)), key
        else:
            assert raw_o[key] == raw_b[key], key
    assert any(raw_o[k] != raw_b[k] for k in updated)  # fp8 is coarse, but the LoRA shows

    # The fp32 merge of the upcast weights is the fused diffusers model holding those same weights.
    model = flux_transformer()
    upcast = flux_components(load_file(str(base32)), flux.config)["transformer"]
    model.load_state_dict(upcast, strict=True)
    state_dict, _, metadata = FluxLoraLoaderMixin.lora_state_dict(
        str(FIXTURES / fixture), return_alphas=True, return_lora_metadata=True
    )
    load_into(FluxLoraLoaderMixin, {"transformer": model}, state_dict, None, metadata)
    fuse(model)
    want = plain_weights(model)
    got = flux_components(merged32, flux.config)["transformer"]
    assert set(got) == set(want)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")


# Values just below, at and just above the midpoints between neighbouring fp8 values in [1, 2) (e4m3fn steps
# 1/8 there, e5m2 1/4): rounding the fp32 sum a second time on the way (through bf16 or fp16, or adding in a
# narrower type) moves some of them to the other neighbour.
MIDPOINT_OFFSETS = [
    m + o for m in (1 / 16, 3 / 16, 5 / 16, 1 / 8, 3 / 8, 5 / 8) for o in (-(2**-12), -(2**-20), 0.0, 2**-20, 2**-12)
] + [0.0, 0.5]


@pytest.mark.parametrize("fp8", FP8, ids=["e4m3fn", "e5m2"])
def test_fp8_merge_rounds_once(flux, tmp_path, fp8):
    """A rank-1 LoRA whose update is exact in fp32 on weights of +-1: the result is (W.float() + dW).to(fp8)
    computed here, bit for bit, in a plain weight and in a fused qkv."""
    sd8 = {k: v.to(fp8 if k.endswith(".weight") else torch.bfloat16) for k, v in load_file(str(flux.base)).items()}
    lora: StateDict = {}
    expected = {}
    for name, key in (
        ("lora_unet_double_blocks_0_img_attn_proj", "double_blocks.0.img_attn.proj.weight"),
        ("lora_unet_double_blocks_1_txt_attn_qkv", "double_blocks.1.txt_attn.qkv.weight"),
    ):
        rows, cols = sd8[key].shape
        assert cols == len(MIDPOINT_OFFSETS)
        sign = torch.tensor([(-1.0) ** i for i in range(rows)])
        sd8[key] = sign.unsqueeze(1).expand(rows, cols).to(fp8).contiguous()
        lora[f"{name}.lora_up.weight"] = sign.unsqueeze(1).contiguous()
        lora[f"{name}.lora_down.weight"] = torch.tensor([MIDPOINT_OFFSETS])
        lora[f"{name}.alpha"] = torch.tensor(1.0)
        exact = sd8[key].float() + lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]
        assert torch.equal(exact.abs() - 1, torch.tensor([MIDPOINT_OFFSETS]).expand(rows, cols))  # no rounding yet
        expected[key] = exact.to(fp8)
        assert not torch.equal(expected[key], exact.to(torch.bfloat16).to(fp8))  # rounding twice shows
    base = save(sd8, tmp_path / "base8.safetensors")
    path = tmp_path / "midpoints.safetensors"
    save_file(lora, str(path), metadata={"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"})
    dest = tmp_path / "merged.safetensors"
    report = loratool.merge(base, [path], dest, device="cpu")
    assert report.tensors_updated == 2
    out = load_file(str(dest))
    for key, want in expected.items():
        assert out[key].dtype == fp8
        assert out[key].view(torch.uint8).equal(want.view(torch.uint8)), key
    raw_b, raw_o = read_raw(base)[2], read_raw(dest)[2]
    assert {k for k in raw_b if raw_b[k] != raw_o[k]} == set(expected)


def scaled_fp8(sd: StateDict, fp8: torch.dtype = torch.float8_e4m3fn) -> StateDict:
    """A ComfyUI scaled fp8 checkpoint of `sd`: every 2-D weight in fp8 under a per-tensor
    `scale_weight` (its largest magnitude maps to fp8's largest value), an input scale on one of them,
    biases and norms in bf16, and the `scaled_fp8` marker."""
    out: StateDict = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.dim() == 2:
            scale = value.abs().max() / torch.finfo(fp8).max
            out[key] = (value / scale).to(fp8)
            out[key.removesuffix("weight") + "scale_weight"] = scale.float().reshape(())
        else:
            out[key] = value.to(torch.bfloat16)
    first = next(k for k in out if k.endswith(".scale_weight"))
    out[first.removesuffix("scale_weight") + "scale_input"] = torch.tensor(1.0)
    out["scaled_fp8"] = torch.zeros(0, dtype=fp8)
    return out


def dequantized(sd: StateDict) -> StateDict:
    """What ComfyUI computes with: each scaled weight times its scale, in fp32."""
    out = {}
    for key, value in sd.items():
        scale = sd.get(key.removesuffix("weight") + "scale_weight") if key.endswith(".weight") else None
        out[key] = value.float() * scale if scale is not None else value.float()
    return out


def test_scaled_fp8_base_is_requantized_under_a_fresh_scale(flux, tmp_path):
    """Each updated weight is the fp32 merge of its dequantized values, quantized again under the scale
    that maps its new largest magnitude to fp8's largest value, that scale written beside it; every other
    tensor (scales of untouched weights, the input scale, the marker) is copied byte for byte. The fp32
    merge is the same values merged as fp32 (checked against diffusers above)."""
    scaled = scaled_fp8(load_file(str(flux.base)))
    base8 = save(scaled, tmp_path / "scaled.safetensors")
    base32 = save(dequantized(scaled), tmp_path / "dequantized.safetensors")
    fixture = "flux_diffusers.safetensors"
    out8, out32 = tmp_path / "out8.safetensors", tmp_path / "out32.safetensors"
    report = merge(base8, [fixture], out8)
    merge(base32, [fixture], out32)

    meta_b, layout_b, raw_b = read_raw(base8)
    meta_o, layout_o, raw_o = read_raw(out8)
    assert (meta_o, layout_o) == (meta_b, layout_b)
    merged8, merged32, before32 = load_file(str(out8)), load_file(str(out32)), load_file(str(base32))
    updated = {k for k, v in before32.items() if k.endswith(".weight") and not torch.equal(merged32[k], v)}
    rescaled = {k.removesuffix("weight") + "scale_weight" for k in updated}
    assert updated and report.tensors_updated == len(updated) + len(rescaled)
    for key in raw_b:
        if key in updated:
            limit = torch.finfo(torch.float8_e4m3fn).max
            scale = float(merged32[key].abs().max()) / limit
            assert merged8[key.removesuffix("weight") + "scale_weight"].item() == pytest.approx(scale, rel=1e-6)
            want = (merged32[key] / merged8[key.removesuffix("weight") + "scale_weight"]).clamp(-limit, limit)
            assert merged8[key].view(torch.uint8).equal(want.to(torch.float8_e4m3fn).view(torch.uint8)), key
            assert merged8[key].float().abs().max() == limit  # the full fp8 range is used again
        elif key not in rescaled:
            assert raw_o[key] == raw_b[key], key
    # what ComfyUI computes with is the merge, to fp8's precision (3 mantissa bits: half a step is 1/16)
    for key in updated:
        got = merged8[key].float() * merged8[key.removesuffix("weight") + "scale_weight"]
        step = merged8[key.removesuffix("weight") + "scale_weight"].item() * 2**-9  # the subnormal step
        torch.testing.assert_close(got, merged32[key], rtol=2**-4, atol=step)


def test_scaled_fp8_base_with_dtype_is_written_dequantized(flux, tmp_path):
    """`--dtype bf16`: every scaled weight is written as its dequantized value (merged where the LoRA
    touches it), and the scales, the input scale and the marker are left out: ComfyUI then loads a plain
    bf16 checkpoint."""
    scaled = scaled_fp8(load_file(str(flux.base)))
    base8 = save(scaled, tmp_path / "scaled.safetensors")
    base32 = save(dequantized(scaled), tmp_path / "dequantized.safetensors")
    fixture = "flux_diffusers.safetensors"
    out16, out32 = tmp_path / "out16.safetensors", tmp_path / "out32.safetensors"
    merge(base8, [fixture], out16, dtype="bf16")
    merge(base32, [fixture], out32)
    merged16, merged32 = load_file(str(out16)), load_file(str(out32))
    quantization = {k for k in scaled if k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp8"}
    assert set(merged16) == set(scaled) - quantization
    for key, value in merged16.items():
        assert value.dtype == torch.bfloat16, key
        assert torch.equal(value, merged32[key].to(torch.bfloat16)), key


def test_block_scaled_fp8_weights_are_refused(flux, tmp_path):
    """HF's fp8 checkpoints keep `weight_scale_inv` per block: an update added to the stored values would
    be scaled by them; merge says so and writes nothing."""
    sd = load_file(str(flux.base))
    key = next(k for k in sd if k.endswith("img_attn.qkv.weight"))
    sd[key.removesuffix("weight") + "weight_scale_inv"] = torch.ones(1)
    base = save(sd, tmp_path / "block_scaled.safetensors")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError, match="block-scaled fp8"):
        merge(base, ["flux_diffusers.safetensors"], out)
    assert not out.exists()


# -- 5. shapes come from the base ------------------------------------------------------------------------------------
def widened(sd: StateDict, key: str, rows: int = 0, cols: int = 0) -> StateDict:
    out = dict(sd)
    w = sd[key]
    out[key] = torch.zeros(w.shape[0] + rows, w.shape[1] + cols, *w.shape[2:], dtype=w.dtype)
    return out


@pytest.mark.parametrize(
    ("family", "fixture", "key", "rows", "cols", "module"),
    [
        (  # a plain weight, one out-width too wide
            "sd1",
            "kohya_sd15.safetensors",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            32,
            0,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
        (  # OpenCLIP in_proj of another hidden width: q/k/v blocks of another size
            "sdxl",
            "kohya_sdxl.safetensors",
            SDXL_TE2_PREFIX + "transformer.resblocks.1.attn.in_proj_weight",
            0,
            16,
            "lora_te2_text_model_encoder_layers_1_self_attn_",
        ),
        (  # Flux linear1 with another MLP width: the fused kohya module no longer adds up
            "flux",
            "kohya_flux.safetensors",
            "single_blocks.0.linear1.weight",
            128,
            0,
            "lora_unet_single_blocks_0_linear1",
        ),
        (  # ...and diffusers' split proj_mlp, which lands in that block
            "flux",
            "flux_diffusers.safetensors",
            "single_blocks.1.linear1.weight",
            128,
            0,
            "transformer.single_transformer_blocks.1.proj_mlp",
        ),
        (  # Flux qkv over another input width
            "flux",
            "flux_diffusers.safetensors",
            "double_blocks.0.txt_attn.qkv.weight",
            0,
            8,
            "transformer.transformer_blocks.0.attn.add_",
        ),
        (  # Flux qkv with rows beyond q, k and v (3 x its input width): the row blocks are not Flux's
            "flux",
            "kohya_flux.safetensors",
            "double_blocks.0.img_attn.qkv.weight",
            32,
            0,
            "lora_unet_double_blocks_0_img_attn_qkv",
        ),
    ],
    ids=["sd1-to_q", "sdxl-in_proj", "flux-linear1-kohya", "flux-linear1-diffusers", "flux-qkv", "flux-qkv-rows"],
)
def test_base_of_the_wrong_width_is_refused(request, tmp_path, family, fixture, key, rows, cols, module):
    fam: Family = request.getfixturevalue(family)
    base = save(widened(load_file(str(fam.base)), key, rows, cols), tmp_path / "wrong.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "merged.safetensors"
    with pytest.raises(MergeError, match=re.escape(module)):
        merge(base, [fixture], dest, allow_unmatched=True)
    assert list(out.iterdir()) == []


# -- 6. a result beyond the output dtype --------------------------------------------------------------------------
def test_fp16_overflow_is_refused_and_writes_nothing(sd1, tmp_path):
    """Weight 1e8: the fixture's largest update is 0.04 (x 1e6 would still fit fp16), so every updated tensor
    overflows fp16 while staying finite in fp32."""
    base = save({k: v.half() for k, v in load_file(str(sd1.base)).items()}, tmp_path / "fp16.safetensors")
    fixture = "kohya_sd15.safetensors"
    ok = tmp_path / "ok.safetensors"
    targeted = assert_mirrors_base(base, ok, merge(base, [fixture], ok))
    ok.unlink()

    out = tmp_path / "out"
    out.mkdir()
    dest = out / "merged.safetensors"
    with pytest.raises(MergeError) as info:
        merge(base, [fixture], dest, weights=[1e8])
    message = str(info.value)
    assert any(k in message for k in targeted), message
    assert not dest.exists() and list(out.iterdir()) == []

    dest.write_bytes(b"an earlier output")
    with pytest.raises(MergeError) as info:
        merge(base, [fixture], dest, weights=[1e8], force=True)
    assert any(k in str(info.value) for k in targeted)
    assert dest.read_bytes() == b"an earlier output"
    assert list(out.iterdir()) == [dest]
