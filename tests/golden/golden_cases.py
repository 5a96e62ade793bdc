"""The golden corpus: what every command does today, over fixtures/ and generated inputs, recorded so
that a reshaping of the code can prove it changed no behaviour.

A case is one command line. Running it records its exit code, its `--json` report (or its text, for
the few text cases), its stderr and the sha256 of every file it wrote. `record.py` writes the
results to golden.json; test_golden.py runs every case again and compares. Paths are written as
`<inputs>` (the generated inputs and the outputs) and `<repo>` (fixtures/), so the record does not
depend on where it ran.

The cases cover: inspect of every LoRA (alone and against bases, including a base of another
model), every source layout converted to every target layout (refusals included), merges into
every kind of base (single-file SD1/SDXL/Flux, a diffusers folder, HF dirs whole and sharded, at
other dtypes and shard sizes), combine, extract, resize, and the error lines of the broken inputs
of tests/robustness/corpus.py run through each command.

The generated inputs come from the same builders the other tests use, seeded; their hashes are
recorded too, so a change in an input is told apart from a change in behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
sys.path[:0] = [str(FIXTURES), str(ROOT / "tests"), str(ROOT / "tests" / "robustness")]

LORA_FIXTURES = [*sorted(p.name for p in FIXTURES.iterdir() if p.suffix == ".safetensors"), "peft_llama"]
TARGETS = ("kohya", "diffusers", "peft")
LYCORIS = ("loha", "loha-tucker", "lokr", "locon-tucker", "mixed", "ia3", "glora", "dora", "norm")


@dataclass(frozen=True)
class Case:
    """argv: the command line; `@name` is a generated input, `@out:case` another case's output,
    `fixtures/...` a file we ship. out: the output's suffix (".safetensors", "" for a directory),
    or None when the command writes nothing. json: run with --json and record the parsed report."""

    name: str
    argv: tuple[str, ...]
    out: str | None = ".safetensors"
    json: bool = True
    env: dict[str, str] = field(default_factory=dict)


def _fixture(name: str) -> str:
    return f"fixtures/{name}"


def _inspect_cases() -> Iterator[Case]:
    loras = [_fixture(n) for n in LORA_FIXTURES]
    loras += ["@unet_lora", "@peft_dora_llama", "@peft_sd_unet"] + [f"@lyco_{n}" for n in LYCORIS]
    for lora in loras:
        yield Case(f"inspect {lora}", ("inspect", lora), out=None)
        yield Case(f"inspect --header-only {lora}", ("inspect", lora, "--header-only"), out=None)
    yield Case("inspect a folder (text)", ("inspect", "@corpus", "--header-only"), out=None, json=False)
    with_base = [
        ("fixtures/kohya_sd15.safetensors", "@base_sd1"),
        ("fixtures/diffusers_sd15.safetensors", "@base_sd1"),
        ("fixtures/lycoris_loha.safetensors", "@base_sd1"),
        ("fixtures/kohya_sdxl.safetensors", "@base_sdxl"),
        ("fixtures/kohya_sdxl.safetensors", "@base_sd1"),  # a base of another model
        ("fixtures/kohya_flux.safetensors", "@base_flux1"),
        ("fixtures/flux_diffusers.safetensors", "@base_flux1"),
        ("fixtures/flux_comfyui.safetensors", "@base_flux1"),
        ("fixtures/flux_xlabs.safetensors", "@base_flux1"),
        ("fixtures/flux_diffusers.safetensors", "@flux_folder"),
        ("fixtures/peft_llama", "@llama_dir"),
        ("fixtures/peft_llama", "@llama_sharded"),
        ("@lyco_dora", "@lyco_dora_base"),
        ("@lyco_dora", "@lyco_dora_pipeline"),
    ]
    for lora, base in with_base:
        yield Case(f"inspect {lora} --base {base}", ("inspect", lora, "--base", base), out=None)
    for lora in ("fixtures/kohya_sd15.safetensors", "fixtures/kohya_flux.safetensors", "fixtures/peft_llama"):
        yield Case(f"inspect {lora} --keys (text)", ("inspect", lora, "--keys"), out=None, json=False)
    yield Case("inspect --strict lyco_glora", ("inspect", "@lyco_glora", "--strict"), out=None)


def _convert_cases() -> Iterator[Case]:
    sources = [_fixture(n) for n in LORA_FIXTURES]
    sources += ["@unet_lora", "@peft_dora_llama", "@peft_sd_unet"] + [f"@lyco_{n}" for n in LYCORIS]
    for src in sources:
        for to in TARGETS:
            yield Case(
                f"convert {src} --to {to}", ("convert", src, "--to", to), out="" if to == "peft" else ".safetensors"
            )
    # second generation: what one target wrote, read back into the others
    for first, then in [("kohya", "diffusers"), ("diffusers", "kohya"), ("kohya", "peft"), ("diffusers", "peft")]:
        for src in ("fixtures/kohya_flux.safetensors", "fixtures/kohya_sd15.safetensors", "fixtures/peft_llama"):
            origin = f"convert {src} --to {first}"
            out = "" if then == "peft" else ".safetensors"
            yield Case(f"{origin} then --to {then}", ("convert", f"@out:{origin}", "--to", then), out=out)
    for src in ("@peft_sd_unet", "fixtures/diffusers_legacy_sd15.safetensors"):
        for arch in ("sd1", "sd2"):
            argv = ("convert", src, "--to", "diffusers", "--arch", arch)
            yield Case(f"convert {src} --to diffusers --arch {arch}", argv)
        yield Case(f"convert {src} --to kohya --arch sd1", ("convert", src, "--to", "kohya", "--arch", "sd1"))
    yield Case(
        "convert sdxl --arch sdxl",
        ("convert", "fixtures/kohya_sdxl.safetensors", "--to", "diffusers", "--arch", "sdxl"),
    )


def _merge_cases() -> Iterator[Case]:
    cpu = ("--device", "cpu")
    onto = {
        "@base_sd1": [
            "fixtures/kohya_sd15.safetensors",
            "fixtures/diffusers_sd15.safetensors",
            "fixtures/diffusers_legacy_sd15.safetensors",
            "fixtures/lycoris_loha.safetensors",
            "fixtures/lycoris_lokr.safetensors",
            "@unet_lora",
            "@peft_sd_unet",
        ],
        "@base_sdxl": ["fixtures/kohya_sdxl.safetensors"],
        "@base_flux1": [
            "fixtures/kohya_flux.safetensors",
            "fixtures/flux_diffusers.safetensors",
            "fixtures/flux_comfyui.safetensors",
            "fixtures/flux_xlabs.safetensors",
        ],
        "@flux_folder": ["fixtures/flux_diffusers.safetensors", "fixtures/kohya_flux.safetensors"],
        "@llama_dir": ["fixtures/peft_llama", "@peft_dora_llama"],
        "@llama_sharded": ["fixtures/peft_llama"],
    }
    for base, loras in onto.items():
        out = "" if base in ("@flux_folder", "@llama_dir", "@llama_sharded") else ".safetensors"
        for lora in loras:
            argv = ("merge", base, lora, "-w", "0.8", *cpu)
            yield Case(f"merge {lora} into {base}", argv, out=out)
            yield Case(f"merge {lora} into {base} --allow-unmatched", (*argv, "--allow-unmatched"), out=out)
    for name in LYCORIS:
        yield Case(f"merge lyco_{name}", ("merge", f"@lyco_{name}_base", f"@lyco_{name}", "-w", "0.7", *cpu))
        yield Case(
            f"merge lyco_{name} into its pipeline",
            ("merge", f"@lyco_{name}_pipeline", f"@lyco_{name}", "-w", "-0.7", *cpu),
            out="",
        )
    two = ("fixtures/kohya_sd15.safetensors", "fixtures/diffusers_sd15.safetensors")
    yield Case("merge two", ("merge", "@base_sd1", *two, "-w", "0.7", "-w", "-0.3", *cpu))
    for dtype in ("fp16", "bf16", "fp32"):
        yield Case(f"merge --dtype {dtype}", ("merge", "@base_sd1", *two, "--dtype", dtype, *cpu))
    yield Case("merge reshard", ("merge", "@llama_dir", "fixtures/peft_llama", "--shard-size", "20KB", *cpu), out="")
    yield Case("merge shard a file", ("merge", "@base_sd1", two[0], "--shard-size", "200KB", *cpu), out="")


def _combine_cases() -> Iterator[Case]:
    sd = ("fixtures/kohya_sd15.safetensors", "fixtures/diffusers_sd15.safetensors")
    flux = ("fixtures/kohya_flux.safetensors", "fixtures/flux_diffusers.safetensors")
    yield Case("combine exact", ("combine", *sd, "-w", "0.7", "-w", "-0.3"))
    yield Case("combine rank", ("combine", *sd, "-w", "0.7", "-w", "-0.3", "--rank", "3"))
    yield Case("combine sd to peft", ("combine", "@unet_lora", "@unet_lora", "--to", "peft"), out="")
    for to in TARGETS:
        out = "" if to == "peft" else ".safetensors"
        yield Case(f"combine flux --to {to}", ("combine", *flux, "--to", to), out=out)
        yield Case(f"combine flux --rank 4 --to {to}", ("combine", *flux, "--rank", "4", "--to", to), out=out)
    yield Case("combine peft rank", ("combine", "fixtures/peft_llama", "@peft_dora_llama", "--rank", "2"), out="")
    yield Case(
        "combine one weight for two", ("combine", "fixtures/peft_llama", "fixtures/peft_llama", "-w", "0.5"), out=""
    )
    two_peft = ("combine", "fixtures/peft_llama", "fixtures/peft_llama", "-w", "0.5", "-w", "0.25")
    yield Case("combine peft exact", two_peft, out="")
    yield Case("combine loha", ("combine", "fixtures/lycoris_loha.safetensors", sd[0]))
    yield Case(
        "combine xlabs comfyui", ("combine", "fixtures/flux_xlabs.safetensors", "fixtures/flux_comfyui.safetensors")
    )


def _extract_cases() -> Iterator[Case]:
    cpu = ("--device", "cpu")
    sd = ("@base_sd1", "@sd1_tuned")
    yield Case("extract rank", ("extract", *sd, "--rank", "2", *cpu))
    yield Case("extract dynamic", ("extract", *sd, "--dynamic", "fro:0.9", "--max-rank", "4", *cpu))
    for rule in ("ratio:4", "cumulative:0.8", "eps:0.01"):
        yield Case(f"extract {rule}", ("extract", *sd, "--dynamic", rule, "--max-rank", "4", *cpu))
    yield Case(
        "extract options",
        ("extract", *sd, "--rank", "2", "--conv-rank", "1", "--alpha", "1", "--clamp-quantile", "0.99", *cpu),
    )
    yield Case("extract exact", ("extract", *sd, "--rank", "2", "--exact", *cpu))
    for to in ("diffusers", "peft"):
        yield Case(
            f"extract --to {to}",
            ("extract", *sd, "--rank", "2", "--to", to, *cpu),
            out="" if to == "peft" else ".safetensors",
        )
    yield Case("extract llama", ("extract", "@wide_base", "@wide_tuned", "--rank", "4", *cpu), out="")
    yield Case("extract llama kohya", ("extract", "@wide_base", "@wide_tuned", "--rank", "4", "--to", "kohya", *cpu))
    yield Case(
        "extract llama dynamic",
        ("extract", "@wide_base", "@wide_tuned", "--dynamic", "fro:0.9", "--max-rank", "4", *cpu),
        out="",
    )
    yield Case("extract flux", ("extract", "@base_flux1", "@flux1_tuned", "--rank", "2", *cpu))
    yield Case(
        "extract flux to diffusers",
        ("extract", "@base_flux1", "@flux1_tuned", "--rank", "2", "--to", "diffusers", *cpu),
    )
    yield Case("extract sdxl", ("extract", "@base_sdxl", "@sdxl_tuned", "--rank", "2", *cpu))
    yield Case("extract nothing differs", ("extract", "@base_sd1", "@base_sd1", "--rank", "2", *cpu))


def _resize_cases() -> Iterator[Case]:
    cpu = ("--device", "cpu")
    for lora in (
        "fixtures/kohya_sd15.safetensors",
        "fixtures/kohya_flux.safetensors",
        "fixtures/diffusers_sd15.safetensors",
    ):
        yield Case(f"resize {lora} rank", ("resize", lora, "--rank", "2", *cpu))
        yield Case(f"resize {lora} dynamic", ("resize", lora, "--dynamic", "fro:0.9", *cpu))
    yield Case("resize peft", ("resize", "fixtures/peft_llama", "--rank", "2", *cpu), out="")
    yield Case("resize peft ratio", ("resize", "fixtures/peft_llama", "--dynamic", "ratio:2", *cpu), out="")
    yield Case("resize peft dora", ("resize", "@peft_dora_llama", "--rank", "2", *cpu), out="")
    yield Case("resize loha refused", ("resize", "fixtures/lycoris_loha.safetensors", "--rank", "2", *cpu))


def static_cases() -> list[Case]:
    """Every case that does not depend on the broken-input corpus."""
    cases = [
        *_inspect_cases(),
        *_convert_cases(),
        *_merge_cases(),
        *_combine_cases(),
        *_extract_cases(),
        *_resize_cases(),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


def refusal_cases(corpus: list) -> list[Case]:
    """Each broken input through each command that takes that kind of input."""
    cases = []
    for broken in corpus:
        at = f"@corpus/{broken.path.name}"
        if broken.role == "adapter":
            cases += [
                Case(f"refused: inspect {broken.name}", ("inspect", at), out=None),
                Case(f"refused: inspect --header-only {broken.name}", ("inspect", at, "--header-only"), out=None),
                Case(f"refused: convert {broken.name}", ("convert", at, "--to", "kohya")),
                Case(
                    f"refused: merge {broken.name}", ("merge", "@corpus/valid_base.safetensors", at, "--device", "cpu")
                ),
                Case(f"refused: resize {broken.name}", ("resize", at, "--rank", "2", "--device", "cpu")),
            ]
        else:
            lora = "@corpus/valid_lora.safetensors"
            cases += [
                Case(f"refused: merge into {broken.name}", ("merge", at, lora, "--device", "cpu")),
                Case(f"refused: inspect --base {broken.name}", ("inspect", lora, "--base", at), out=None),
                Case(
                    f"refused: extract from {broken.name}",
                    ("extract", at, "@corpus/valid_tuned.safetensors", "--rank", "2", "--device", "cpu"),
                ),
            ]
    return cases


# ---------------------------------------------------------------------------------------------------
# generated inputs
# ---------------------------------------------------------------------------------------------------


def build_inputs(root: Path) -> tuple[dict[str, Path], list]:
    """Every generated input under root, by the name cases use after `@`, and the broken-input
    corpus (tests/robustness/corpus.py) under root/corpus."""
    import torch
    from corpus import build as build_corpus
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from test_determinism import make_inputs, tuned_copy
    from test_inspect_base import bases
    from test_merge_lycoris import build as build_lycoris
    from tiny_models import llama, sd15_unet

    made = {k: Path(v) for k, v in vars(make_inputs(_mkdir(root / "shared"))).items()}
    made["base_sd1"] = made.pop("sd1")
    for name, path in bases(_mkdir(root / "bases")).items():
        made[f"base_{name}"] = path
    for name in ("flux1", "sdxl"):
        tuned = root / "bases" / f"{name}_tuned.safetensors"
        save_file(tuned_copy(load_file(made[f"base_{name}"]), seed=3), tuned)
        made[f"{name}_tuned"] = tuned

    for name in LYCORIS:
        for layout, suffix in (("single-file", "_base"), ("diffusers", "_pipeline")):
            _, base, lora = build_lycoris(name, _mkdir(root / "lycoris" / f"{name}{suffix}"), layout)
            made[f"lyco_{name}{suffix}"] = base
        made[f"lyco_{name}"] = lora

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, init_lora_weights=False
    )
    model = get_peft_model(llama(), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=g))
    model.save_pretrained(root / "peft_dora_llama")
    made["peft_dora_llama"] = root / "peft_dora_llama"

    torch.manual_seed(0)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
    unet = get_peft_model(sd15_unet(), LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    unet.save_pretrained(root / "peft_sd_unet")
    made["peft_sd_unet"] = root / "peft_sd_unet"

    _, corpus = build_corpus(root / "corpus")
    made["corpus"] = root / "corpus"
    for path in sorted(root.rglob("*.safetensors")):
        _sort_metadata(path)
    return made, corpus


def _sort_metadata(path: Path) -> None:
    """Put a safetensors file's metadata in key order, in place.

    safetensors hands metadata to Rust as a hash map, so files it writes list their metadata in an
    order that changes from process to process; inputs must be the same bytes every time. Files
    whose header is not exactly what safetensors writes (the broken corpus) are left alone."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    try:
        text = raw[8 : 8 + size].decode("utf-8")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        return
    if json.dumps(header, separators=(",", ":")) != text.rstrip(" "):
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, separators=(",", ":")).ljust(size)
    path.write_bytes(raw[:8] + new.encode("utf-8") + raw[8 + size :])


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------
# running a case and describing what it did
# ---------------------------------------------------------------------------------------------------


def tree_hashes(path: Path, work: Path) -> dict[str, str]:
    """sha256 of a file (under "") or of every file below a directory, by relative path. Paths
    written into the files (PEFT's base_model_name_or_path) are neutral first, as in reports."""

    def neutral(data: bytes) -> bytes:
        return data.replace(str(work).encode(), b"<inputs>").replace(str(ROOT).encode(), b"<repo>")

    def digest(p: Path) -> str:
        data = p.read_bytes()
        if p.suffix == ".safetensors" and len(data) >= 8:  # a path changes the header's length and padding
            size = int.from_bytes(data[:8], "little")
            if size <= len(data) - 8:
                return hashlib.sha256(neutral(data[8 : 8 + size]).rstrip(b" ") + b"\0" + data[8 + size :]).hexdigest()
        return hashlib.sha256(neutral(data)).hexdigest()

    if path.is_file():
        return {"": digest(path)}
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


class Runner:
    """Runs cases in order (later ones may read earlier outputs) with paths made neutral."""

    def __init__(self, inputs: dict[str, Path], work: Path) -> None:
        self.inputs = inputs
        self.work = work
        self.outputs: dict[str, Path] = {}
        self.out_dir = _mkdir(work / "out")

    def path_of(self, token: str) -> str:
        if token.startswith("@out:"):
            return str(self.outputs[token[len("@out:") :]])
        if token.startswith("@corpus/"):
            return str(self.inputs["corpus"] / token[len("@corpus/") :])
        if token.startswith("@"):
            return str(self.inputs[token[1:]])
        if token.startswith("fixtures/"):
            return str(ROOT / token)
        return token

    def neutral(self, text: str) -> str:
        text = text.replace(str(self.work), "<inputs>").replace(str(ROOT), "<repo>")
        return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)

    def run(self, case: Case, index: int) -> dict:
        from click.testing import CliRunner

        from loratool.cli import main

        argv = [self.path_of(a) for a in case.argv]
        dest = None
        if case.out is not None:
            dest = self.out_dir / f"{index:03d}{case.out}"
            shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
            argv += ["-o", str(dest)]
        argv += ["--json"] if case.json else []
        argv += ["--quiet"] if argv[0] != "inspect" or case.json else []
        result = CliRunner(env={"COLUMNS": "100", **case.env}).invoke(main, argv, catch_exceptions=True)
        record: dict = {"exit": result.exit_code}
        stdout = self.neutral(result.stdout)
        if case.json and stdout.strip():
            record["report"] = json.loads(stdout)
        elif stdout:
            record["stdout"] = stdout
        if result.stderr:
            record["stderr"] = self.neutral(result.stderr)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            record["exception"] = f"{type(result.exception).__name__}: {result.exception}"
        if dest is not None:
            record["files"] = tree_hashes(dest, self.work)
            if dest.exists():
                self.outputs[case.name] = dest
        return record


def input_hashes(inputs: dict[str, Path], work: Path) -> dict[str, str]:
    """One digest per generated input (a directory's files hashed by relative path), to tell a
    change of input from a change of behaviour."""
    out = {}
    for name, path in sorted(inputs.items()):
        digest = hashlib.sha256(json.dumps(tree_hashes(path, work), sort_keys=True).encode()).hexdigest()
        out[name] = digest
    return out


GOLDEN = Path(__file__).with_name("golden.json")

# The same arithmetic on every x86-64 CPU: MKL's reproducible code path, torch's and oneDNN's
# baseline kernels. Left to choose, they pick AVX-512 or AMX where the CPU has it, and the last bits
# of a sum or an SVD then depend on the machine the corpus is replayed on.
NUMERICS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def run_all(work: Path) -> dict:
    """Build the inputs under work, run every case in order, and return the record: the inputs'
    digests and each case's result by name.

    It runs in a fresh interpreter with a fixed str hash salt, one CPU thread and the baseline
    kernels (`NUMERICS`): the peers that build some inputs (PEFT's target_modules set) write set
    orders as they come, and float sums then group the same way on any x86-64 machine."""
    out = work / "record.json"
    env = {**os.environ, **NUMERICS, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["TRANSFORMERS_OFFLINE"] = env["DIFFUSERS_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, __file__, str(work), str(out)], env=env, capture_output=True, text=True, timeout=1200
    )
    if done.returncode != 0:
        raise RuntimeError(f"the golden corpus did not run: {done.stderr[-4000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


def _run_here(work: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    inputs, corpus = build_inputs(work)
    runner = Runner(inputs, work)
    cases = static_cases() + refusal_cases(corpus)
    results = {case.name: runner.run(case, i) for i, case in enumerate(cases)}
    return {"inputs": input_hashes(inputs, work), "cases": results}


if __name__ == "__main__":
    record = _run_here(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(record), encoding="utf-8")
