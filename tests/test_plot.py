"""`inspect --plot` and `extract --plot`: real PNGs with the bars and lines they promise, drawn from
numbers that are checked on their own, and refused up front when they cannot be written."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.image import imread
from safetensors.torch import load_file

import loratool
from loratool.archs.blocks import block_of
from loratool.cli import main
from loratool.plot import COMPONENT_COLORS, block_norms

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(ROOT / "tests" / "robustness"))
from corpus import valid_inputs  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return valid_inputs(tmp_path_factory.mktemp("valid"))


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])


def pixels_of(image: np.ndarray, hex_color: str) -> int:
    """Pixels drawn in exactly this colour (bars are solid fills)."""
    return int((np.abs(image[..., :3] - rgb(hex_color)) < 1.5 / 255).all(axis=-1).sum())


def read_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise AssertionError(f"{path} is not a PNG")
    image = imread(path)
    height, width = image.shape[:2]
    assert width >= 1000 and height >= 600, image.shape
    # Not a blank canvas: many distinct colours (text, antialiased lines, bars).
    distinct = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(distinct) > 50, len(distinct)
    return image


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down1"),
        ("unet.mid_block.attentions.0.proj_in", "mid"),
        ("unet.up_blocks.3.resnets.2.conv1", "up3"),
        ("unet.conv_in", "other"),
        ("text_encoder.text_model.encoder.layers.11.mlp.fc1", "layer11"),
        ("transformer.transformer_blocks.4.attn.to_q", "block4"),
        ("transformer.single_transformer_blocks.37.proj_out", "single37"),
        ("model.layers.7.self_attn.q_proj", "layer7"),
        ("transformer.h.2.attn.c_attn", "block2"),
        ("text_encoder_3.encoder.block.5.layer.0.SelfAttention.q", "block5"),
    ],
)
def test_block_of_names_the_block(path, expected):
    assert block_of(path)[2] == expected


def test_block_order_runs_down_mid_up_and_double_before_single():
    down, mid, up = (block_of(f"unet.{p}.x")[:2] for p in ("down_blocks.3", "mid_block", "up_blocks.0"))
    assert down < mid < up
    blocks = ("transformer_blocks.18", "single_transformer_blocks.0")
    double, single = (block_of(f"transformer.{p}.x")[:2] for p in blocks)
    assert double < single


def test_block_norms_add_the_modules_squared_norms():
    report = loratool.inspect(FIXTURES / "kohya_sd15.safetensors")
    blocks = block_norms(report.modules)
    by_label = {(b.component, b.label): b for b in blocks}
    expected_down0 = math.sqrt(
        sum(m.dw_norm**2 for m in report.modules if m.targets[0].startswith("unet.down_blocks.0."))
    )
    assert by_label[("unet", "down0")].norm == pytest.approx(expected_down0, rel=1e-12)
    assert sum(b.modules for b in blocks) == len(report.modules)
    assert blocks[0].component == "te"  # text encoder first, then the UNet, input to output
    unet = [b.label for b in blocks if b.component == "unet"]
    assert unet.index("down0") < unet.index("mid") < unet.index("up1")


def test_singular_values_in_the_report_are_those_of_the_update():
    report = loratool.inspect(FIXTURES / "kohya_sdxl.safetensors")
    tensors = load_file(FIXTURES / "kohya_sdxl.safetensors")
    module = next(m for m in report.modules if m.name.endswith("attn2_to_k"))
    up = tensors[f"{module.name}.lora_up.weight"].float()
    down = tensors[f"{module.name}.lora_down.weight"].float()
    expected = torch.linalg.svdvals(module.scale * (up.flatten(1) @ down.flatten(1)))[: module.rank]
    assert module.singular_values == pytest.approx(expected.tolist(), rel=1e-4)
    assert math.sqrt(sum(s * s for s in module.singular_values)) == pytest.approx(module.dw_norm, rel=1e-5)


@pytest.mark.parametrize(
    ("fixture", "components"),
    [
        ("kohya_sd15.safetensors", ("te", "unet")),
        ("kohya_sdxl.safetensors", ("te1", "te2", "unet")),
        ("kohya_flux.safetensors", ("te1", "transformer")),
        ("peft_llama", ("model",)),
        ("lycoris_loha.safetensors", ("te", "unet")),  # no factor spectrum: bars only
    ],
)
def test_inspect_plot_draws_a_bar_per_component(tmp_path, fixture, components):
    out = tmp_path / "plot.png"
    result = run("inspect", FIXTURES / fixture, "--plot", out)
    assert result.exit_code == 0, result.output
    image = read_png(out)
    for component in components:
        assert pixels_of(image, COMPONENT_COLORS[component]) > 500, component
    drawn = {c for c, colour in COMPONENT_COLORS.items() if pixels_of(image, colour) > 500}
    assert drawn <= {*components, "te1" if "te" in components else "te"}  # te and te1 share a colour


def test_inspect_plot_with_json_still_prints_the_document(tmp_path):
    out = tmp_path / "plot.png"
    result = run("inspect", FIXTURES / "peft_llama", "--plot", out, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["modules"][0]["singular_values"]
    read_png(out)


def test_extract_plot_shows_retained_energy(valid, tmp_path):
    out = tmp_path / "extract.png"
    dest = tmp_path / "lora.safetensors"
    result = run("extract", valid.base, valid.tuned, "--rank", 4, "-o", dest, "--plot", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {m["component"] for m in report["modules"]} == {"te", "unet"}
    assert all(m["target"] for m in report["modules"])
    image = read_png(out)
    assert pixels_of(image, COMPONENT_COLORS["unet"]) > 5000
    assert pixels_of(image, COMPONENT_COLORS["te"]) > 500
    assert dest.is_file()


def test_missing_matplotlib_is_refused_before_any_work(valid, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    dest = tmp_path / "lora.safetensors"
    for args in (
        ("inspect", FIXTURES / "kohya_sd15.safetensors", "--plot", tmp_path / "a.png"),
        ("extract", valid.base, valid.tuned, "--rank", 4, "-o", dest, "--plot", tmp_path / "b.png"),
    ):
        result = run(*args)
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert lines == ['loratool: error: --plot needs matplotlib: pip install "loratool[plot]"']
    assert list(tmp_path.iterdir()) == []  # no extraction ran, no picture started


def test_plot_path_is_checked_like_any_output(valid, tmp_path):
    lora = FIXTURES / "kohya_sd15.safetensors"
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep me")
    result = run("inspect", lora, "--plot", existing)
    assert result.exit_code == 2 and "exists (use --force" in result.output
    assert existing.read_bytes() == b"keep me"
    result = run("inspect", lora, "--plot", existing, "--force")
    assert result.exit_code == 0
    read_png(existing)

    result = run("inspect", lora, "--plot", tmp_path / "plot.svg")
    assert result.exit_code == 2 and "ending in .png" in result.output
    result = run("inspect", lora, "--plot", tmp_path / "missing" / "plot.png")
    assert result.exit_code == 2 and "does not exist" in result.output

    same = tmp_path / "same.png"
    result = run("extract", valid.base, valid.tuned, "--rank", 2, "-o", same, "--plot", same)
    assert result.exit_code == 2 and "same path" in result.output
    assert not same.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]  # no temporary file left


def test_plot_api_returns_a_figure(tmp_path):
    from loratool.plot import inspect_figure, save_png

    figure = inspect_figure(loratool.inspect(FIXTURES / "kohya_flux.safetensors"))
    bars, spectra = figure.axes[:2]
    assert len(bars.patches) == 6  # te1 layer0/1, double blocks 0/1, single blocks 0/1
    assert len(spectra.lines) == 38  # one spectrum per LoRA module
    path = save_png(figure, tmp_path / "flux.png")
    read_png(path)
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # the umask's permissions, not mkstemp's
