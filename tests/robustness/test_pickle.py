"""Pickle checkpoints: refused by default, read as tensors only with --allow-pickle, never run.

corpus.py checks the default refusal for every command; here --allow-pickle gives the same results
as the safetensors file with the same tensors, and a pickle that would run code is refused
without running it.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from corpus import Valid, valid_inputs
from deltas import deltas
from safetensors.torch import load_file

import loratool
from loratool.cli import main
from loratool.errors import InputError


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    return valid_inputs(tmp_path_factory.mktemp("valid"))


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch) -> Path:
    """Pickles are copied to a temporary safetensors file; every test checks none is left."""
    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield scratch
    assert list(scratch.iterdir()) == []


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def as_pickle(src: Path, dest: Path, nest: str | None = None, zipfile: bool = True) -> Path:
    tensors = load_file(src)
    obj = {nest: tensors, "global_step": 1000, "epoch": 3} if nest else tensors
    torch.save(obj, dest, _use_new_zipfile_serialization=zipfile)
    return dest


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_allow_pickle_reads_a_lora_like_its_safetensors_twin(valid, tmp_path, zipfile):
    pt = as_pickle(valid.lora, tmp_path / "lora.pt", zipfile=zipfile)
    refused = run(["inspect", str(pt)])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr

    ours = loratool.inspect(pt, allow_pickle=True)
    twin = loratool.inspect(valid.lora)
    assert (ours.format, ours.architecture) == (twin.format, twin.architecture)
    assert [m.to_json() for m in ours.modules] == [m.to_json() for m in twin.modules]

    out = tmp_path / "converted.safetensors"
    # A pickle has no metadata to say sd1 rather than sd2 (same module names, different layouts).
    args = ["--arch", "sd1", "--allow-pickle", "--quiet"]
    result = run(["convert", str(pt), "--to", "diffusers", "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    want, got = deltas(valid.lora), deltas(out)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_allow_pickle_merges_into_a_ckpt_like_into_its_safetensors_twin(valid, tmp_path):
    ckpt = as_pickle(valid.base, tmp_path / "base.ckpt", nest="state_dict")
    lora_pt = as_pickle(valid.lora, tmp_path / "lora.pt")
    from_pickle, from_safetensors = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    args = ["--allow-pickle", "--quiet"]
    assert run(["merge", str(ckpt), str(lora_pt), "-o", str(from_pickle), *args]).exit_code == 0
    assert run(["merge", str(valid.base), str(valid.lora), "-o", str(from_safetensors), "--quiet"]).exit_code == 0
    same_tensors(from_pickle, from_safetensors)


def test_allow_pickle_extracts_from_ckpts_like_from_safetensors(valid, tmp_path):
    base = as_pickle(valid.base, tmp_path / "base.ckpt", nest="state_dict")
    tuned = as_pickle(valid.tuned, tmp_path / "tuned.pth")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["--rank", "2", "--quiet"]
    assert run(["extract", str(base), str(tuned), "-o", str(a), *common, "--allow-pickle"]).exit_code == 0
    assert run(["extract", str(valid.base), str(valid.tuned), "-o", str(b), *common]).exit_code == 0
    same_tensors(a, b)


def test_allow_pickle_reads_pickle_model_and_adapter_directories(valid, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(valid.peft / "adapter_config.json", adapter)
    as_pickle(valid.peft / "adapter_model.safetensors", adapter / "adapter_model.bin")
    model = tmp_path / "model"
    shutil.copytree(valid.llama_dir, model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    bin_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        as_pickle(model / shard, model / name)
        (model / shard).unlink()
        bin_map.update({k: name for k, v in index["weight_map"].items() if v == shard})
    (model / "model.safetensors.index.json").unlink()
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": bin_map}))

    for args in (["inspect", str(adapter)], ["inspect", str(valid.peft), "--base", str(model)]):
        refused = run(args)
        assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr, refused.stderr
        assert run([*args, "--allow-pickle"]).exit_code == 0

    report = loratool.inspect(valid.peft, base=model, allow_pickle=True)
    assert not [f for f in report.findings if f.severity == "error"]
    assert [m.to_json() for m in loratool.inspect(adapter, allow_pickle=True).modules] == [
        m.to_json() for m in loratool.inspect(valid.peft).modules
    ]
    merged = run(["merge", str(model), str(valid.peft), "-o", str(tmp_path / "merged"), "--allow-pickle"])
    assert merged.exit_code == 2
    assert "pickle weights cannot be mirrored" in merged.stderr
    assert not (tmp_path / "merged").exists()


class RunsCode:
    """Unpickling this calls Path.touch: what a malicious checkpoint does with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_pickle_that_runs_code_is_refused_without_running_it(valid, tmp_path, how):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {**load_file(valid.lora), "payload": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as fh:
            pickle.dump(payload, fh)
    for args in (
        ["inspect", str(evil), "--allow-pickle"],
        ["merge", str(valid.base), str(evil), "-o", str(tmp_path / "m.safetensors"), "--allow-pickle"],
        ["extract", str(valid.base), str(evil), "--rank", "2", "-o", str(tmp_path / "e.safetensors"), "--allow-pickle"],
    ):
        result = run(args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "unexpected" not in lines[0], result.stderr
        assert "refused" in lines[0] or "not a readable torch checkpoint" in lines[0], lines[0]
        assert not marker.exists()
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ([1, 2, 3], "not a dict of tensors"),
        ({"step": 3}, "no named tensors"),
        ({"state_dict": {"a": 1}}, "no named tensors"),
    ],
)
def test_pickles_without_tensors_are_input_errors(tmp_path, content, expect):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(InputError, match=expect):
        loratool.load_adapter(path, allow_pickle=True)


def test_a_damaged_pickle_is_an_input_error(valid, tmp_path):
    path = as_pickle(valid.lora, tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[:5000])
    result = run(["inspect", str(path), "--allow-pickle"])
    assert result.exit_code == 2
    assert "not a readable torch checkpoint" in result.stderr
