"""No command's memory follows shapes a file merely declares (issue 19).

A 100 KB LoKr file can declare a 49152 x 49152 Kronecker product for a 3072 x 3072 layer, a 2 MB
LoRA a rank of 65536, a LoHa 10^10 values. Every command runs on such files in a process limited
to 2 GB of address space: each ends in a clear one-line error or a report with a finding naming
the module, never a traceback, never an allocation failure.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

LIMIT = 2 << 30  # bytes of address space
FLUX = "lora_unet_double_blocks_0_img_attn_proj"  # a 3072 x 3072 layer
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # SD1: 320 x 320 x 3 x 3
CUSTOM = "lora_unet_custom_layer_0"  # no table knows it


def _files(root: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    alpha = torch.tensor(4.0)
    lokr = {"lokr_w1": r(16, 16), "lokr_w2_a": r(3072, 4), "lokr_w2_b": r(4, 3072), "alpha": alpha}
    huge_rank = {"lora_down.weight": r(65536, 8), "lora_up.weight": r(8, 65536), "alpha": alpha}
    loha = {"hada_w1_a": r(100000, 1), "hada_w1_b": r(1, 100000), "hada_w2_a": r(100000, 1)}
    loha |= {"hada_w2_b": r(1, 100000), "alpha": torch.tensor(1.0)}
    kernel = {"lora_down.weight": r(1, 320, 32, 32), "lora_up.weight": r(320, 1, 1, 1), "alpha": alpha}
    made = {}
    for label, module, tensors in [
        ("lokr-flux", FLUX, lokr),
        ("lokr-unknown", CUSTOM, lokr),
        ("rank-65536-flux", FLUX, huge_rank),
        ("rank-65536-unknown", CUSTOM, huge_rank),
        ("loha-flux", FLUX, loha),
        ("loha-unknown", CUSTOM, loha),
        ("kernel-32x32-sd1", CONV, kernel),
    ]:
        path = root / f"{label}.safetensors"
        save_file({f"{module}.{k}": v for k, v in tensors.items()}, str(path))
        made[label] = path
    base = root / "base.safetensors"
    save_file(
        {
            "double_blocks.0.img_attn.proj.weight": torch.zeros(3072, 3072, dtype=torch.bfloat16),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": torch.zeros(
                320, 320, 3, 3, dtype=torch.float16
            ),
        },
        str(base),
    )
    made["base"] = base
    return made


# Runs in the limited process: every command on every file, through the CLI, in one interpreter.
DRIVER = r"""
import json, sys
from click.testing import CliRunner
from loratool.cli import main
files, out = json.loads(sys.argv[1]), sys.argv[2]
results = []
for label, path in files.items():
    if label == "base":
        continue
    for args in (
        ["inspect", path, "--json"],
        ["inspect", path, "--json", "--base", files["base"]],
        ["convert", path, "--to", "kohya", "-o", f"{out}/k.safetensors", "--force", "--quiet"],
        ["convert", path, "--to", "diffusers", "-o", f"{out}/d.safetensors", "--force", "--quiet"],
        ["convert", path, "--to", "peft", "-o", f"{out}/p", "--force", "--quiet"],
        ["resize", path, "--rank", "4", "-o", f"{out}/r.safetensors", "--force", "--quiet"],
        ["combine", path, path, "-o", f"{out}/c.safetensors", "--force", "--quiet"],
        ["merge", files["base"], path, "-o", f"{out}/m.safetensors", "--force", "--device", "cpu", "--quiet"],
    ):
        result = CliRunner().invoke(main, args, catch_exceptions=True)
        unforeseen = result.exception is not None and result.exit_code not in (0, 1, 2)
        results.append({"file": label, "args": args[0] + (" --base" if "--base" in args else ""),
                        "exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                        "exception": repr(result.exception) if unforeseen else None})
print(json.dumps(results))
"""


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("hostile")
    files = {k: str(v) for k, v in _files(root).items()}
    (root / "out").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(files), str(root / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_address_space,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_every_command_ends_cleanly_within_two_gigabytes(outcomes) -> None:
    assert len(outcomes) == 7 * 8
    for o in outcomes:
        where = f"{o['file']} / {o['args']}"
        assert o["exception"] is None, where
        assert "Traceback" not in o["stderr"] and "unexpected" not in o["stderr"], (where, o["stderr"])
        assert "allocate" not in o["stderr"], (where, o["stderr"])
        if o["exit"] != 0:
            assert o["stderr"].count("\n") == 1 and o["stderr"].startswith("loratool: error: "), (where, o["stderr"])


def _inspect(outcomes, label: str, base: bool = False) -> dict:
    (o,) = [o for o in outcomes if o["file"] == label and o["args"] == "inspect" + (" --base" if base else "")]
    return json.loads(o["stdout"])


@pytest.mark.parametrize(
    ("label", "code", "words"),
    [
        ("lokr-flux", "shape-mismatch", "[49152, 49152], larger than the model's layer"),
        ("loha-flux", "shape-mismatch", "[100000, 100000], larger than the model's layer"),
        ("kernel-32x32-sd1", "shape-mismatch", "[320, 320, 32, 32], larger than the model's layer"),
        ("loha-unknown", "update-unmeasured", "100000 x 100000 update (10,000,000,000 values)"),
    ],
)
def test_inspect_names_the_module_whose_declared_update_is_too_large(outcomes, label, code, words) -> None:
    findings = _inspect(outcomes, label)["findings"]
    matching = [f for f in findings if f["code"] == code]
    assert matching and words in matching[0]["message"], findings
    assert matching[0]["module"] in (FLUX, CONV, CUSTOM)


def test_a_kronecker_product_is_measured_from_its_factors(outcomes) -> None:
    """||kron(w1, w2)|| = ||w1|| ||w2||: the unknown layer's LoKr gets its norm without the product."""
    report = _inspect(outcomes, "lokr-unknown")
    (module,) = report["modules"]
    assert module["shape"] == [49152, 49152] and module["dw_norm"] > 0


def test_a_rank_beyond_the_layer_is_measured_without_an_r_by_r_core(outcomes) -> None:
    report = _inspect(outcomes, "rank-65536-unknown")
    (module,) = report["modules"]
    assert module["rank"] == 65536 and module["numerical_rank"] == 8
    assert "rank-deficient" in {f["code"] for f in report["findings"]}


@pytest.mark.parametrize("label", ["lokr-flux", "loha-flux", "kernel-32x32-sd1"])
def test_merge_refuses_before_reading_data(outcomes, label) -> None:
    (o,) = [o for o in outcomes if o["file"] == label and o["args"] == "merge"]
    assert o["exit"] == 2 and "in the base" in o["stderr"]
