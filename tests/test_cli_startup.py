"""The command line answers without torch: `import loratool`, `import loratool.cli`, --help of every
command, --version and shell completion import no torch module, and neither do a header-only
inspect or a convert that only renames keys and copies bytes. (How fast they answer is measured in
benchmarks/startup.py; here only what is imported is checked.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import loratool
from loratool import api, options
from loratool.archs import architectures
from loratool.commands.merge import DTYPE_CHOICES
from loratool.formats import LAYOUTS

# Run the entry point with torch made unimportable: any `import torch` on the way fails the command.
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from loratool.cli import main; main()"
COMMANDS = ("inspect", "convert", "merge", "combine", "extract", "resize")


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("module", ["loratool", "loratool.cli"])
def test_importing_loratool_imports_no_torch(module):
    done = _run(f"import {module}")
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True
    )
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert "loratool" in imported or module == "loratool"
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS)])
def test_help_and_version_need_no_torch(args):
    done = _run(WITHOUT_TORCH, *args)
    assert done.returncode == 0, done.stderr
    assert ("Usage: " in done.stdout) if "--help" in args else done.stdout.startswith("loratool, version ")


def test_shell_completion_needs_no_torch():
    env = {"_LORATOOL_COMPLETE": "bash_complete", "COMP_WORDS": "loratool convert x --to ", "COMP_CWORD": "4"}
    done = _run(WITHOUT_TORCH.replace("main()", "main(prog_name='loratool')"), env=env)
    assert done.returncode == 0, done.stderr
    offered = [line.split(",", 1)[1] for line in done.stdout.splitlines()]
    assert offered == list(options.TARGET_LAYOUTS)


def test_the_option_choices_are_the_registries_they_name():
    assert tuple(sorted(LAYOUTS)) == options.TARGET_LAYOUTS
    assert tuple(DTYPE_CHOICES) == options.DTYPE_CHOICES
    assert options.architecture_names() == tuple(sorted(architectures()))


def test_the_lazy_package_exports_the_api():
    assert set(loratool.__all__) == {"__version__", *api.__all__}
    for name in api.__all__:
        assert getattr(loratool, name) is getattr(api, name)
    with pytest.raises(AttributeError):
        loratool.no_such_name  # noqa: B018


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_header_only_scan_needs_no_torch():
    args = ("inspect", str(FIXTURES), "--header-only", "--json")
    without = _run(WITHOUT_TORCH, *args)
    assert without.returncode == 0, without.stderr
    with_torch = _run("from loratool.cli import main; main()", *args)
    assert without.stdout == with_torch.stdout and len(without.stdout.splitlines()) == 11


@pytest.mark.parametrize(
    ("source", "to"),
    [("kohya_sd15", "diffusers"), ("kohya_sdxl", "comfyui"), ("flux_comfyui", "kohya"), ("lycoris_loha", "comfyui")],
)
def test_a_renaming_convert_needs_no_torch(tmp_path, source, to):
    """Keys renamed, bytes copied (and checked for NaN/inf as bytes): the same file as with torch."""
    outputs = []
    for name, code in (("without", WITHOUT_TORCH), ("with", "from loratool.cli import main; main()")):
        dest = tmp_path / f"{name}.safetensors"
        done = _run(code, "convert", str(FIXTURES / f"{source}.safetensors"), "--to", to, "-o", str(dest), "-q")
        assert done.returncode == 0, done.stderr
        outputs.append(dest.read_bytes())
    assert outputs[0] == outputs[1]


def test_a_damaged_factor_is_refused_by_its_bytes(tmp_path):
    tensors = load_file(FIXTURES / "kohya_sd15.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("lora_down.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    done = _run(
        WITHOUT_TORCH, "convert", str(tmp_path / "nan.safetensors"), "--to", "diffusers", "-o", str(tmp_path / "o")
    )
    assert done.returncode == 2 and f"tensor {key!r} holds NaN or inf values" in done.stderr


def test_a_large_header_only_scan_in_worker_processes_answers_in_order_as_one_process_does(tmp_path):
    """Without torch loaded, a scan of many files runs in one process per core; the lines come in
    the same order with the same content as a scan here (where torch is loaded, so it runs alone)."""
    library = tmp_path / "library"
    library.mkdir()
    sources = sorted(FIXTURES.glob("*.safetensors"))
    for i in range(160):
        shutil.copy(sources[i % len(sources)], library / f"lora_{i:03d}.safetensors")
    done = _run(
        WITHOUT_TORCH + "\nimport os; assert os.cpu_count() >= 1", "inspect", str(library), "--header-only", "--json"
    )
    assert done.returncode == 0, done.stderr
    here = [json.loads(json.dumps(s.report.to_json())) for s in loratool.inspect_each([library], header_only=True)]
    assert [json.loads(line) for line in done.stdout.splitlines()] == here
