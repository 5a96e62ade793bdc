"""The `loratool inspect` command line contract, through the installed command.

Readable tables and one JSON document for a usable file; for an unusable one exactly one line on
stderr (`loratool: error: ...`), exit code 2 and never a traceback. Every case runs once, in a module
fixture, through click's test runner on the real entry point; a subset also runs as the installed
command in its own process (concurrently: each pays the interpreter and torch start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
Q = BLOCK + "attn1_to_q"
FF = BLOCK + "ff_net_2"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
# module -> (out, in, kernel, alpha); rank 4 everywhere
MODULES = {
    Q: (32, 32, (), 2.0),
    FF: (32, 128, (), 2.0),
    TE: (48, 48, (), 2.0),
    CONV: (32, 32, (3, 3), 4.0),
}
TARGETS = {
    Q: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    FF: "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    TE: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    CONV: "unet.down_blocks.0.resnets.0.conv1",
}
RANK = 4
META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "4"}),
    "ss_base_model_version": "sd_v1",
}


def clean_lora() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for name, (out, inp, kernel, alpha) in MODULES.items():
        sd[f"{name}.lora_down.weight"] = (torch.randn(RANK, inp, *kernel, generator=g) * 0.05).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out, RANK, *([1, 1] if kernel else []), generator=g) * 0.05).half()
        sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return sd


def loratool_command() -> list[str]:
    exe = shutil.which("loratool", path=str(Path(sys.executable).parent)) or shutil.which("loratool")
    return [exe] if exe else [sys.executable, "-m", "loratool.cli"]


def _peft_lora_weights(path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.randn(8, 32, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(32, 8, generator=g),
        },
        str(path),
        metadata={"format": "pt"},
    )


def _inputs(d: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Write every input; return (usable runs, unusable runs) as argument lists."""
    clean = d / "clean.safetensors"
    save_file(clean_lora(), str(clean), metadata=META)
    raw = clean.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])

    def write(name: str, data: bytes) -> Path:
        (d / name).write_bytes(data)
        return d / name

    def inspect(path: Path, *extra: str) -> list[str]:
        return ["inspect", str(path), *extra]

    inf_alpha = clean_lora()
    inf_alpha[f"{Q}.alpha"] = torch.tensor(float("inf"), dtype=torch.float16)
    save_file(inf_alpha, str(d / "inf_alpha.safetensors"), metadata=META)
    ok = {
        "text": inspect(clean),
        "keys": inspect(clean, "--keys"),
        "json": inspect(clean, "--json"),
        "json inf alpha": inspect(d / "inf_alpha.safetensors", "--json"),
        "version": ["--version"],
        "help": ["--help"],
    }

    bad: dict[str, list[str]] = {}
    bad["truncated data"] = inspect(write("cut_data.safetensors", raw[: 8 + n + (len(raw) - 8 - n) // 2]))
    bad["truncated header"] = inspect(write("cut_header.safetensors", raw[: 8 + n // 2]))
    garbage = b"\x00\xffnot a json header at all\x7f"
    bad["garbage header"] = inspect(write("garbage.safetensors", struct.pack("<Q", len(garbage)) + garbage + bytes(64)))
    bad["header past end"] = inspect(write("long_header.safetensors", struct.pack("<Q", 1 << 20) + b'{"a": {}}'))
    bad["empty file"] = inspect(write("empty.safetensors", b""))
    bad["missing path"] = inspect(d / "does_not_exist.safetensors")
    (d / "no_weights").mkdir()
    (d / "no_weights" / "notes.txt").write_text("nothing here\n")
    bad["directory without weights"] = inspect(d / "no_weights")
    plain = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8),
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3),
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
    }
    save_file(plain, str(d / "checkpoint.safetensors"))
    bad["not a LoRA"] = inspect(d / "checkpoint.safetensors")
    save_file({}, str(d / "no_tensors.safetensors"), metadata={"ss_network_dim": "4"})
    bad["zero tensors"] = inspect(d / "no_tensors.safetensors")
    torch.save({"state_dict": clean_lora()}, d / "model.ckpt")
    bad["pickle ckpt"] = inspect(d / "model.ckpt")
    torch.save(clean_lora(), d / "pickle_named.safetensors")
    bad["pickle named .safetensors"] = inspect(d / "pickle_named.safetensors")
    broken = d / "peft_broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    _peft_lora_weights(broken / "adapter_model.safetensors")
    bad["peft broken config"] = inspect(broken)
    vera = d / "peft_vera"  # an adapter type loratool does not read yet (issue 20)
    vera.mkdir()
    config = {"peft_type": "VERA", "r": 4, "target_modules": ["k_proj"], "save_projection": False}
    (vera / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.k_proj.vera_lambda_b": torch.ones(16),
            "base_model.model.model.layers.0.self_attn.k_proj.vera_lambda_d": torch.ones(4),
        },
        str(vera / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    bad["peft VeRA"] = inspect(vera)
    bad["base missing"] = inspect(clean, "--base", str(d / "no_such_base"))
    return ok, bad


# Words the one error line must contain (case-insensitive): it names the actual problem.
EXPECTED_WORDS = {
    "truncated data": ["not a valid safetensors"],
    "truncated header": ["not a valid safetensors"],
    "garbage header": ["not a valid safetensors"],
    "header past end": ["not a valid safetensors"],
    "empty file": ["empty"],
    "missing path": ["does_not_exist", "no such"],
    "directory without weights": ["no_weights"],
    "not a LoRA": ["checkpoint.safetensors"],
    "zero tensors": ["no tensors"],
    "pickle ckpt": ["pickle"],
    "pickle named .safetensors": ["pickle_named.safetensors"],
    "peft broken config": ["adapter_config.json"],
    "peft VeRA": ["VERA"],
    "base missing": ["no_such_base"],
}


# The installed command, run as a real process, for a subset: it pays the interpreter and torch start-up
# each time (seconds), so the rest runs in-process through the same click entry point.
PROCESS_CASES = ("json", "version", "truncated data", "not a LoRA", "peft VeRA")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _in_process(args: list[str]) -> Run:
    from click.testing import CliRunner

    from loratool.cli import main

    result = CliRunner().invoke(main, args, prog_name="loratool")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What the real command would print when an exception escapes.
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return Run(result.exit_code, result.stdout, stderr)


def _process(args: list[str], env: dict[str, str]) -> Run:
    result = subprocess.run([*loratool_command(), *args], capture_output=True, text=True, timeout=300, env=env)
    return Run(result.returncode, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Run]:
    """(case, "process" | "in-process") -> what the command did."""
    d = tmp_path_factory.mktemp("cli")
    ok, bad = _inputs(d)
    cases = {**ok, **bad}
    assert set(bad) == set(EXPECTED_WORDS)
    # Wide enough that rich never folds a module name across lines.
    env = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with ThreadPoolExecutor(max_workers=len(PROCESS_CASES)) as pool:
        futures = {name: pool.submit(_process, cases[name], env) for name in PROCESS_CASES}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("COLUMNS", "250")
            results = {(name, "in-process"): _in_process(args) for name, args in cases.items()}
        results |= {(name, "process"): f.result() for name, f in futures.items()}
    return results


def _modes(names) -> list:
    return [
        pytest.param(n, m, id=f"{n}-{m}")
        for n in names
        for m in ("in-process", "process")
        if m != "process" or n in PROCESS_CASES
    ]


def _ok(result: Run) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == ""
    return result.stdout


def _strict_json(text: str) -> dict:
    """One standard JSON document: json.loads refuses trailing data; NaN and Infinity are not JSON."""

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=reject)


def _line(stdout: str, label: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.split()[:1] == [label]]
    assert len(lines) == 1, (label, stdout)
    return lines[0]


def test_text_report(runs) -> None:
    out = _ok(runs["text", "in-process"])
    assert "kohya" in _line(out, "format")
    assert "sd1" in _line(out, "architecture")
    assert _line(out, "rank").split()[1:] == ["4"]
    alpha = _line(out, "alpha")
    assert "2" in alpha.split()[1:] and "4" in alpha.split()[1:]
    assert "no findings" in out
    assert TE not in out  # the per-module table is --keys'


def test_keys_lists_every_module(runs) -> None:
    out = _ok(runs["keys", "in-process"])
    for name, target in TARGETS.items():
        assert name in out
        assert target in out
    row = next(ln for ln in out.splitlines() if CONV in ln)
    assert "32x32x3x3" in row


@pytest.mark.parametrize("mode", ["in-process", "process"])
def test_json_document(runs, mode: str) -> None:
    doc = _strict_json(_ok(runs["json", mode]))
    assert {"format", "architecture", "modules", "findings", "metadata", "summary"} <= set(doc)
    assert doc["format"] == "kohya"
    assert doc["architecture"] == "sd1"
    assert doc["findings"] == []
    assert doc["summary"]["findings"] == {"error": 0, "warning": 0, "info": 0}
    assert doc["metadata"]["header"]["ss_network_dim"] == "4"
    modules = {m["name"]: m for m in doc["modules"]}
    assert set(modules) == set(MODULES)
    sd = clean_lora()
    for name, (out, inp, kernel, alpha) in MODULES.items():
        m = modules[name]
        assert {"name", "targets", "target", "kind", "rank", "alpha", "scale", "dtype", "shape", "dw_norm"} <= set(m)
        assert m["targets"] == [TARGETS[name]] and m["target"] == TARGETS[name]
        assert (m["kind"], m["rank"], m["alpha"], m["dtype"]) == ("lora", RANK, alpha, "F16")
        assert m["scale"] == pytest.approx(alpha / RANK)
        assert m["shape"] == [out, inp, *kernel]
        up = sd[f"{name}.lora_up.weight"].double().flatten(1)
        down = sd[f"{name}.lora_down.weight"].double().flatten(1)
        assert m["dw_norm"] == pytest.approx(float((alpha / RANK * up @ down).norm()), rel=1e-6)


@pytest.mark.parametrize("mode", ["in-process", "process"])
def test_version(runs, mode: str) -> None:
    from loratool import __version__

    assert __version__ in _ok(runs["version", mode])


def test_help(runs) -> None:
    out = _ok(runs["help", "in-process"])
    assert "inspect" in out and "Usage" in out


@pytest.mark.parametrize(("case", "mode"), _modes(sorted(EXPECTED_WORDS)))
def test_unusable_input(runs, case: str, mode: str) -> None:
    result = runs[case, mode]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("loratool: error: ")
    assert "please report" not in line  # the catch-all for unforeseen exceptions: not a handled input error
    for word in EXPECTED_WORDS[case]:
        assert word.lower() in line.lower(), line
    assert result.stdout == ""


def test_json_with_a_non_finite_alpha(runs) -> None:
    """An infinite alpha is a finding (nan-inf), not a reason to fail writing the report."""
    doc = _strict_json(_ok(runs["json inf alpha", "in-process"]))
    assert ("nan-inf", "error", Q) in {(f["code"], f["severity"], f["module"]) for f in doc["findings"]}
    assert {m["name"] for m in doc["modules"]} == set(MODULES)
