"""The committed fixtures: loratool reads each as its generator says it was written, and the real
libraries (diffusers, LyCORIS, PEFT) agree on what the files contain.

fixtures/MANIFEST.json records, per fixture, the format, architecture, factor dtype and for each
module its kind, rank, effective alpha, scale and canonical targets, taken from the generator and
the library objects that wrote the file, never from loratool.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import loratool

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
GENERATOR = FIXTURES / "make_fixtures.py"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text(encoding="utf-8"))["fixtures"]
NAMES = sorted(MANIFEST)
SD_FLUX = [n for n in NAMES if MANIFEST[n]["architecture"] in ("sd1", "sd2", "sdxl", "flux1")]
REL = 1e-3  # alphas stored as fp16/bf16 tensors are exact for the values used; scales are ratios of them


@cache
def generator_module():
    """fixtures/make_fixtures.py as a module, for its tiny model builders."""
    spec = importlib.util.spec_from_file_location("make_fixtures", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def report(name: str) -> loratool.InspectReport:
    return loratool.inspect(FIXTURES / name)


def lora_module_paths(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Module paths of a PEFT-style state dict (`<path>.lora_A.weight` / `.lora_B.weight`)."""
    out = set()
    for key in state_dict:
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix):
                out.add(key[: -len(suffix)])
    return out


def with_text_model(path: str) -> str:
    """Canonical CLIP text-encoder paths keep the `text_model.` level; some diffusers outputs drop it."""
    component, _, rest = path.partition(".")
    if component.startswith("text_encoder") and rest.startswith("encoder.layers."):
        return f"{component}.text_model.{rest}"
    return path


def diffusers_peft_paths(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """What diffusers' loaders make of a converted state dict: its own PEFT conversion, then module paths."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    done = (".lora_A.weight", ".lora_B.weight")
    peft = {k: v for k, v in state_dict.items() if k.endswith(done)}
    unet = {k: v for k, v in state_dict.items() if k.startswith("unet.") and not k.endswith(done)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith("unet.") and not k.endswith(done)}
    if unet:
        peft.update(convert_unet_state_dict_to_peft(unet))
    if rest:  # text encoders in the attention-processor naming
        peft.update(convert_state_dict_to_peft(convert_state_dict_to_diffusers(rest)))
    leftovers = [k for k in peft if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    assert not leftovers, f"diffusers left keys it did not convert: {leftovers[:5]}"
    return {with_text_model(p) for p in lora_module_paths(peft)}


def loratool_targets(name: str, skip_modules: tuple[str, ...] = ()) -> set[str]:
    return {t for m in report(name).modules if not m.name.endswith(skip_modules) for t in m.targets}


# ------------------------------------------------------------------------------------------------
# loratool against the manifest
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_format_and_architecture(name: str) -> None:
    r = report(name)
    expected = MANIFEST[name]
    assert (r.format, r.architecture) == (expected["format"], expected["architecture"]), r.architecture_reason


@pytest.mark.parametrize("name", NAMES)
def test_modules_match_manifest(name: str) -> None:
    expected = MANIFEST[name]
    modules = {m.name: m for m in report(name).modules}
    assert set(modules) == set(expected["modules"])
    wrong = []
    for module_name, want in expected["modules"].items():
        m = modules[module_name]
        got = {"kind": m.kind, "rank": m.rank, "alpha": m.alpha, "scale": m.scale, "targets": m.targets}
        ok = (
            m.kind == want["kind"]
            and m.rank == want["rank"]
            and m.alpha is not None
            and math.isclose(m.alpha, want["alpha"], rel_tol=REL)
            and m.scale is not None
            and math.isclose(m.scale, want["scale"], rel_tol=REL)
            and m.targets == want["targets"]
            and m.dtype == expected["dtype"]
        )
        if not ok:
            wrong.append(f"{module_name}: loratool {got} dtype {m.dtype}, manifest {want} dtype {expected['dtype']}")
    assert not wrong, "\n".join(wrong[:10]) + f"\n({len(wrong)} modules differ)"


@pytest.mark.parametrize("name", SD_FLUX)
def test_every_module_resolves_to_targets(name: str) -> None:
    unresolved = [m.name for m in report(name).modules if not m.targets]
    assert not unresolved


@pytest.mark.parametrize("name", NAMES)
def test_clean_fixture_has_no_warnings_or_errors(name: str) -> None:
    problems = [f"{f.severity} {f.code} {f.module}: {f.message}" for f in report(name).findings if f.severity != "info"]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def _cli() -> list[str]:
    exe = shutil.which("loratool")
    return [exe] if exe else [sys.executable, "-m", "loratool.cli"]


@pytest.fixture(scope="module")
def cli_runs() -> dict[str, subprocess.CompletedProcess]:
    """`loratool inspect PATH --json` on every fixture, run concurrently (each process imports torch)."""

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*_cli(), "inspect", str(FIXTURES / name), "--json", "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(NAMES, pool.map(run, NAMES), strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_cli_json(name: str, cli_runs: dict[str, subprocess.CompletedProcess]) -> None:
    done = cli_runs[name]
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)  # exactly one JSON document
    assert {"format", "architecture", "modules", "findings", "metadata", "summary"} <= set(document)
    assert document["format"] == MANIFEST[name]["format"]
    assert document["architecture"] == MANIFEST[name]["architecture"]
    assert {m["name"] for m in document["modules"]} == set(MANIFEST[name]["modules"])


# ------------------------------------------------------------------------------------------------
# Cross-checks with the libraries that define the layouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kohya_sd15.safetensors", "kohya_sdxl.safetensors"])
def test_kohya_sd_targets_match_diffusers_converter(name: str) -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    sd = load_file(FIXTURES / name)
    if name == "kohya_sdxl.safetensors":
        converted, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
            dict(sd), unet_config=SimpleNamespace(layers_per_block=2)
        )
    else:
        converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(sd))
    assert diffusers_peft_paths(converted) == loratool_targets(name)


def test_kohya_flux_targets_match_diffusers_converter() -> None:
    """diffusers splits fused qkv into to_q/to_k/to_v itself. It hard-codes full-size Flux widths for
    single_blocks linear1 (dims 3072,3072,3072,12288), so those modules cannot go through it at hidden
    32: they are left out on both sides (their targets are checked against the manifest above)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    name = "kohya_flux.safetensors"
    sd = {k: v for k, v in load_file(FIXTURES / name).items() if "_linear1." not in k}
    converted, _ = FluxLoraLoaderMixin.lora_state_dict(dict(sd), return_alphas=True)
    assert diffusers_peft_paths(converted) == loratool_targets(name, skip_modules=("_linear1",))


def test_xlabs_targets_match_diffusers_converter() -> None:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    name = "flux_xlabs.safetensors"
    converted, _ = FluxLoraLoaderMixin.lora_state_dict(dict(load_file(FIXTURES / name)), return_alphas=True)
    assert diffusers_peft_paths(converted) == loratool_targets(name)


def test_legacy_targets_match_diffusers_converter() -> None:
    name = "diffusers_legacy_sd15.safetensors"
    assert diffusers_peft_paths(load_file(FIXTURES / name)) == loratool_targets(name)


def _peft_layer_values(model: torch.nn.Module, component: str) -> dict[str, tuple[int, float, float]]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            (adapter,) = layer.r
            out[f"{component}.{path}" if component else path] = (
                layer.r[adapter],
                layer.lora_alpha[adapter],
                layer.scaling[adapter],
            )
    return out


def _manifest_values(name: str) -> dict[str, tuple[int, float, float]]:
    return {n: (m["rank"], m["alpha"], m["scale"]) for n, m in MANIFEST[name]["modules"].items()}


def test_diffusers_sd15_loads_into_tiny_models() -> None:
    """diffusers loads its own file into the tiny UNet and CLIP with the manifest's ranks, alphas and scales."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    mf = generator_module()
    unet, text_encoder = mf.sd15_unet(), mf.clip_text_model()
    path = str(FIXTURES / "diffusers_sd15.safetensors")
    sd, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, alphas, unet, metadata=metadata)
        StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(sd, alphas, text_encoder, metadata=metadata)
    loaded = {**_peft_layer_values(unet, "unet"), **_peft_layer_values(text_encoder, "text_encoder")}
    assert loaded == _manifest_values("diffusers_sd15.safetensors")


def test_flux_diffusers_loads_into_tiny_flux() -> None:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    flux = generator_module().flux_transformer()
    path = str(FIXTURES / "flux_diffusers.safetensors")
    sd, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True, return_alphas=True)
    FluxLoraLoaderMixin.load_lora_into_transformer(sd, alphas, flux, metadata=metadata)
    assert _peft_layer_values(flux, "transformer") == _manifest_values("flux_diffusers.safetensors")


def test_peft_adapter_loads_with_peft() -> None:
    from peft import PeftModel

    model = PeftModel.from_pretrained(generator_module().llama(), str(FIXTURES / "peft_llama"))
    assert _peft_layer_values(model.base_model.model, "") == _manifest_values("peft_llama")


PRESET_KEYS = ("unet_target_module", "unet_target_name", "text_encoder_target_module", "text_encoder_target_name")
PRESET_ATTRS = (
    "UNET_TARGET_REPLACE_MODULE",
    "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME",
)


@pytest.mark.parametrize("name", ["lycoris_loha.safetensors", "lycoris_lokr.safetensors"])
def test_lycoris_reads_its_own_files(name: str) -> None:
    """lycoris-lora rebuilds every module from the file, with the manifest's kind and scale."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    mf = generator_module()
    unet, text_encoder = mf.sd15_unet(), mf.kohya_clip()
    # create_network_from_weights first builds a throwaway network from the class-level preset, and
    # lycoris-lora 4.1.3's default preset names the UNet's time_embedding twice (TimestepEmbedding class
    # and "time_embedding.linear_1"), which trips its duplicate-name assertion: target nothing while reading.
    saved = {attr: getattr(LycorisNetworkKohya, attr) for attr in PRESET_ATTRS}
    LycorisNetworkKohya.apply_preset({key: [] for key in PRESET_KEYS})
    try:
        network, _ = create_network_from_weights(1.0, str(FIXTURES / name), None, text_encoder, unet)
    finally:
        for attr, value in saved.items():
            setattr(LycorisNetworkKohya, attr, value)
    loaded = {m.lora_name: m for m in network.unet_loras + network.text_encoder_loras}
    expected = MANIFEST[name]["modules"]
    assert set(loaded) == set(expected)
    kind = {"loha": "LohaModule", "lokr": "LokrModule"}
    for module_name, want in expected.items():
        assert type(loaded[module_name]).__name__ == kind[want["kind"]]
        assert math.isclose(float(loaded[module_name].scale), want["scale"], rel_tol=REL), module_name


@pytest.mark.parametrize("name", [n for n in NAMES if MANIFEST[n]["format"] == "kohya"])
def test_kohya_model_hash_is_sha256_of_data_region(name: str) -> None:
    raw = (FIXTURES / name).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + header_len])["__metadata__"]
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len :]).hexdigest()


# ------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    """The generated files: not the generators, nor the real headers tests build files from."""
    skip = {"make_fixtures.py", "tiny_models.py", "from_headers.py", "README.md"}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.relative_to(root).parts[0] != "headers"
        and not (p.parent == root and p.name in skip)
    }


def test_fixture_files_are_small() -> None:
    big = {k: len(v) for k, v in _tree(FIXTURES).items() if len(v) >= 1_000_000}
    assert not big


def _without_provenance(value: object) -> object:
    """A JSON value without the library versions that wrote it (`peft_version`, `unet.peft_version`)."""
    if isinstance(value, dict):
        return {k: _without_provenance(v) for k, v in value.items() if k.rsplit(".", 1)[-1] != "peft_version"}
    return value


def comparable(name: str, raw: bytes) -> bytes:
    """A fixture's bytes with provenance masked: what a regeneration must reproduce exactly.

    Library versions are recorded in the files PEFT and diffusers write (adapter_config.json, and the
    PEFT config inside `lora_adapter_metadata`); a new version of a library that writes the same
    tensors, names and settings is not a change of the fixture. Key order and everything else count.
    """
    if name.endswith(".json"):
        return json.dumps(_without_provenance(json.loads(raw))).encode()
    if name.endswith(".safetensors"):
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])
        metadata = header.get("__metadata__", {})
        if "lora_adapter_metadata" in metadata:
            config = json.loads(metadata["lora_adapter_metadata"])
            metadata["lora_adapter_metadata"] = json.dumps(_without_provenance(config))
        return json.dumps(header).encode() + raw[8 + size :]
    return raw


def test_generator_reproduces_committed_files(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(GENERATOR), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh, committed = _tree(tmp_path), _tree(FIXTURES)
    assert sorted(fresh) == sorted(committed)
    differ = [k for k in committed if comparable(k, fresh[k]) != comparable(k, committed[k])]
    assert not differ, f"regenerated files differ from the committed ones: {differ}"


def _bump_peft_version(raw: bytes) -> bytes:
    return raw.replace(b'peft_version\\": \\"0.', b'peft_version\\": \\"10.').replace(
        b'"peft_version": "0.', b'"peft_version": "10.'
    )


@pytest.mark.parametrize("name", ["peft_llama/adapter_config.json", "diffusers_sd15.safetensors"])
def test_fixture_comparison_masks_library_versions_only(name: str) -> None:
    raw = (FIXTURES / name).read_bytes()
    bumped = _bump_peft_version(raw)
    if name.endswith(".safetensors"):  # the header grew or shrank: its length prefix follows
        size = int.from_bytes(raw[:8], "little") + len(bumped) - len(raw)
        bumped = size.to_bytes(8, "little") + bumped[8:]
    assert bumped != raw
    assert comparable(name, bumped) == comparable(name, raw)
    changed = bumped.replace(b"lora_alpha", b"lora_alphx", 1)
    assert comparable(name, changed) != comparable(name, raw)
    if name.endswith(".safetensors"):  # one bit of one tensor
        assert comparable(name, raw[:-1] + bytes([raw[-1] ^ 1])) != comparable(name, raw)
