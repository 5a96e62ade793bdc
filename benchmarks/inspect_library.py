"""How fast `inspect --header-only` scans a LoRA library, and that it answers as the full inspect does.

    python benchmarks/inspect_library.py [--files 2000] [--keep DIR]

Builds a folder of generated LoRA files of mixed layouts: every LoRA we ship in fixtures/ (kohya
SD1.5/SDXL/Flux, diffusers, legacy diffusers, ComfyUI, XLabs, LyCORIS LoHa/LoKr, a PEFT adapter
folder) and the same files converted by loratool to diffusers, comfyui and peft, each copy with its
own subset of modules, its own alphas and its own metadata. Page cache warm. Then times, in one
process: the header-only scan of the whole folder (`inspect_each`), and the full inspect of every
file; in a process that has not loaded torch, the header-only scan as the command line runs it
(one worker process per core, each file's JSON line rendered in its worker, the architecture tables
loaded as the files ask for them); and, as a user runs it, `loratool inspect FOLDER --header-only
--json` (process start included). Checks that every file gets the same format, architecture and
per-module rank and alpha from both. Last, the header-only rate on one full-size SDXL kohya LoRA
(986 modules, 2958 keys), where parsing the header itself is most of the work.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and benchmarks/inspect.py would
# shadow the standard library's `inspect` module that torch imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loratool import api  # noqa: E402
from loratool.archs import get_architecture  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONVERSIONS = {
    "kohya_sd15.safetensors": ("diffusers", "comfyui"),
    "kohya_sdxl.safetensors": ("diffusers", "comfyui"),
    "kohya_flux.safetensors": ("diffusers", "comfyui"),
    "lycoris_loha.safetensors": ("comfyui",),
    "flux_diffusers.safetensors": ("kohya",),
    "peft_llama": ("kohya",),
}


def templates(work: Path) -> list[Path]:
    """The shipped LoRAs and loratool's conversions of them: the layouts of the generated library."""
    found = [*sorted(FIXTURES.glob("*.safetensors")), FIXTURES / "peft_llama"]
    out = work / "templates"
    out.mkdir()
    for name, targets in CONVERSIONS.items():
        for target in targets:
            dest = out / f"{Path(name).stem}_{target}.safetensors"
            api.convert(FIXTURES / name, target, dest)
            found.append(dest)
    api.convert(FIXTURES / "flux_xlabs.safetensors", "peft", out / "flux_xlabs_peft")  # one model: a PEFT dir
    found.append(out / "flux_xlabs_peft")
    return found


def generate(library: Path, sources: list[Path], count: int) -> None:
    """`count` files cycling through the layouts, each with a random share of its template's
    modules (at least one), its alphas scaled and its own metadata."""
    rng = random.Random(0)
    groups = {}
    for source in sources:
        with api.load_adapter(source) as adapter:
            groups[source] = [
                set(m.keys.values()) | ({m.alpha_key} if m.alpha_key else set()) for m in adapter.modules.values()
            ]
    library.mkdir()
    for i in range(count):
        source = sources[i % len(sources)]
        modules = groups[source]
        kept = rng.sample(modules, max(1, round(len(modules) * rng.uniform(0.5, 1.0))))
        keys = set().union(*kept)
        factor = rng.choice((0.5, 1.0, 2.0))
        weights = source / "adapter_model.safetensors" if source.is_dir() else source
        with safe_open(weights, "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = {k: v for k, v in load_file(weights).items() if k in keys or k not in set().union(*modules)}
        for key in tensors:
            if key.endswith(".alpha") and tensors[key].numel() == 1:
                tensors[key] = tensors[key] * factor
        metadata["ss_output_name"] = f"lora_{i:05d}"
        if source.is_dir():
            folder = library / f"lora_{i:05d}"
            folder.mkdir()
            shutil.copy(source / "adapter_config.json", folder / "adapter_config.json")
            save_file(tensors, folder / "adapter_model.safetensors", metadata)
        else:
            save_file(tensors, library / f"lora_{i:05d}.safetensors", metadata)


SCAN_IN_CHILD = """
import os, sys, time
from loratool import api
from loratool.report import inspect_json_line
api.inspect_each  # the API loaded before the clock starts, as a CLI start pays for it
start = time.perf_counter()
n = sum(1 for _ in api.inspect_each([sys.argv[1]], header_only=True, render=inspect_json_line))
print(os.cpu_count(), n / (time.perf_counter() - start))
"""


def answers(report: api.InspectReport) -> tuple:
    return (report.format, report.architecture, [(m.name, m.rank, m.alpha) for m in report.modules])


def warm(library: Path) -> None:
    for path in sorted(library.rglob("*")):
        if path.is_file():
            path.read_bytes()


def full_size_sdxl(work: Path) -> Path:
    """Every default-target SDXL module at rank 1 (the header of a real full SDXL LoRA, tiny data)."""
    arch = get_architecture("sdxl")
    tensors = {}
    for m in arch.modules.values():
        if m.target != "default":
            continue
        name = arch.kohya_name(m.name)
        down = (1, *m.shape[1:]) if m.type == "linear" else (1, m.shape[1], *m.shape[2:])
        up = (m.shape[0], 1) if m.type == "linear" else (m.shape[0], 1, 1, 1)
        tensors[f"{name}.lora_down.weight"] = torch.zeros(down, dtype=torch.float16)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(up, dtype=torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    path = work / "sdxl_full.safetensors"
    save_file(tensors, path, {"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--keep", type=Path, help="work in this directory instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        library = work / "library"
        shutil.rmtree(work / "templates", ignore_errors=True)
        shutil.rmtree(library, ignore_errors=True)
        sources = templates(work)
        generate(library, sources, args.files)
        warm(library)
        list(api.inspect_each([library], header_only=True))  # imports, tables and caches, as a CLI start pays

        start = time.perf_counter()
        fast = list(api.inspect_each([library], header_only=True))
        header_seconds = time.perf_counter() - start
        # As the command line runs it: a process without torch, one worker process per core.
        child = subprocess.run(
            [sys.executable, "-c", SCAN_IN_CHILD, str(library)], capture_output=True, text=True, check=True
        )
        workers, child_rate = child.stdout.split()
        start = time.perf_counter()
        full = list(api.inspect_each([library]))
        full_seconds = time.perf_counter() - start
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "loratool.cli", "inspect", str(library), "--header-only", "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        cli_seconds = time.perf_counter() - start
        lines = [json.loads(line) for line in done.stdout.splitlines()]

        failed = [s.path for s in fast + full if s.report is None]
        differ = [
            a.path
            for a, b in zip(fast, full, strict=True)
            if a.report and b.report and answers(a.report) != answers(b.report)
        ]
        n = len(fast)
        layouts = sorted({s.report.format for s in fast if s.report})
        print(f"library: {n} generated files of {len(sources)} layouts/templates ({', '.join(layouts)})")
        rate = n / header_seconds
        print(f"  header-only scan, one process:   {header_seconds:.2f} s, {rate:,.0f} files/s")
        child_rate = float(child_rate)
        print(f"  header-only scan, {workers} worker processes (no torch): {child_rate:,.0f} files/s (target >= 1000)")
        print(f"  full inspect of every file:      {full_seconds:.2f} s, {n / full_seconds:,.0f} files/s")
        print(
            f"  `loratool inspect DIR --header-only --json`: {cli_seconds:.2f} s with process start, "
            f"{len(lines)} lines, exit {done.returncode}"
        )
        print(
            "  same format, architecture, ranks and alphas as the full inspect: "
            f"{n - len(differ)} of {n} files; unreadable: {len(failed)}"
        )

        big = full_size_sdxl(work)
        api.inspect(big, header_only=True)
        start, rounds = time.perf_counter(), 20
        for _ in range(rounds):
            api.inspect(big, header_only=True)
        seconds = (time.perf_counter() - start) / rounds
        print(
            f"  one full-size SDXL kohya LoRA header (2958 keys): {seconds * 1000:.1f} ms, {1 / seconds:,.0f} files/s"
        )


if __name__ == "__main__":
    main()
