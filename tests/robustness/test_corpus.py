"""Every command against every broken input of corpus.py: one line, a documented exit code, and
nothing written, nothing left behind, nothing changed.

Each test loops over the corpus and reports every case that broke the promise at once, so one
run shows the whole picture rather than the first failure.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from corpus import Case, Valid, build

from loratool.cli import main

ERROR_PREFIX = "loratool: error: "


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Valid, list[Case]]:
    return build(tmp_path_factory.mktemp("corpus"))


def run(args: list[str]) -> Result:
    return CliRunner().invoke(main, [*args, "--quiet"] if args[0] != "inspect" else args, catch_exceptions=True)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (or root itself) with its sha256: inputs must never change."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.exists()}


def refusal_problems(result: Result, expect: str, code: int = 2) -> list[str]:
    """What is wrong with how a command refused (empty when it kept every promise)."""
    problems = []
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"raised {type(result.exception).__name__}: {result.exception}")
    if result.exit_code != code:
        problems.append(f"exit {result.exit_code}, want {code}")
    lines = result.stderr.splitlines()
    if len(lines) != 1 or not lines[0].startswith(ERROR_PREFIX):
        problems.append(f"stderr is not one error line: {result.stderr!r}")
    elif "unexpected" in lines[0] or not re.search(expect, lines[0], re.IGNORECASE):
        problems.append(f"message {lines[0]!r} does not match {expect!r}")
    if "Traceback" in result.output + result.stderr:
        problems.append("traceback printed")
    return problems


def check_all(
    cases: list[Case],
    command: Callable[[Case, Path], list[str]],
    expect: Callable[[Case], tuple[str, int]],
    tmp_path: Path,
) -> None:
    """Run `command` on every case into an empty output directory; collect every broken promise."""
    failures = []
    for case in cases:
        out = tmp_path / case.name
        out.mkdir()
        before = snapshot(case.path) if case.path.exists() else {}
        args = command(case, out / "out.safetensors")
        result = run(args)
        pattern, code = expect(case)
        problems = refusal_problems(result, pattern, code)
        left = sorted(p.name for p in out.iterdir())
        if left:
            problems.append(f"left files behind: {left}")
        if case.path.exists() and snapshot(case.path) != before:
            problems.append("changed its input")
        if problems:
            failures.append(f"{case.name}: {' '.join(args[:1])}: " + "; ".join(problems))
    assert not failures, f"{len(failures)} broken promise(s):\n" + "\n".join(failures)


def adapters(corpus: tuple[Valid, list[Case]]) -> list[Case]:
    return [c for c in corpus[1] if c.role == "adapter"]


def checkpoints(corpus: tuple[Valid, list[Case]]) -> list[Case]:
    return [c for c in corpus[1] if c.role == "checkpoint"]


def is_peft(case: Case) -> bool:
    return case.name.startswith("peft-")


def refused(case: Case) -> tuple[str, int]:
    return case.expect, 2


# -- broken adapters ---------------------------------------------------------------------------------
def test_inspect_refuses_unreadable_adapters(corpus, tmp_path):
    unreadable = [c for c in adapters(corpus) if not c.readable]
    check_all(unreadable, lambda c, _: ["inspect", str(c.path)], refused, tmp_path)


def test_inspect_strict_fails_readable_broken_adapters_with_findings(corpus):
    """A file that parses but holds a broken module is what inspect is for: it reports an
    error-level finding (exit 0), and --strict turns that into exit 1."""
    failures = []
    for case in (c for c in adapters(corpus) if c.readable):
        plain = CliRunner().invoke(main, ["inspect", str(case.path), "--json"])
        strict = CliRunner().invoke(main, ["inspect", str(case.path), "--strict"])
        errors = [f for f in json.loads(plain.output)["findings"] if f["severity"] == "error"] if plain.output else []
        if plain.exit_code != 0 or not errors:
            failures.append(f"{case.name}: inspect exit {plain.exit_code}: {plain.stderr.strip()!r}")
        if strict.exit_code != 1 or len(strict.stderr.splitlines()) != 1:
            failures.append(f"{case.name}: inspect --strict exit {strict.exit_code}: {strict.stderr!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "peft"])
def test_convert_refuses_broken_adapters(corpus, tmp_path, layout):
    def command(case: Case, dest: Path) -> list[str]:
        target = dest.with_suffix("") if layout == "peft" else dest
        return ["convert", str(case.path), "--to", layout, "-o", str(target)]

    check_all(adapters(corpus), command, refused, tmp_path)


def test_merge_refuses_broken_adapters(corpus, tmp_path):
    valid = corpus[0]

    def command(case: Case, dest: Path) -> list[str]:
        if is_peft(case):
            return ["merge", str(valid.llama_dir), str(case.path), "-o", str(dest.with_suffix(""))]
        return ["merge", str(valid.base), str(case.path), "-o", str(dest)]

    check_all(adapters(corpus), command, refused, tmp_path)


def test_combine_refuses_broken_adapters(corpus, tmp_path):
    valid = corpus[0]

    def command(case: Case, dest: Path) -> list[str]:
        other = valid.peft if is_peft(case) else valid.lora
        return ["combine", str(other), str(case.path), "-o", str(dest)]

    check_all(adapters(corpus), command, refused, tmp_path)


def test_resize_refuses_broken_adapters(corpus, tmp_path):
    check_all(adapters(corpus), lambda c, d: ["resize", str(c.path), "--rank", "2", "-o", str(d)], refused, tmp_path)


# -- broken checkpoints ------------------------------------------------------------------------------
def partners(valid: Valid, case: Case) -> tuple[Path, Path]:
    """(a LoRA for this kind of checkpoint, a working checkpoint of the same model)."""
    if case.name.startswith("sharded"):
        return valid.peft, valid.llama_dir
    if case.name.startswith("diffusers"):
        return valid.lora, valid.pipeline
    return valid.lora, valid.base


def _dest_for(case: Case, dest: Path) -> Path:
    return dest if case.path.is_file() or case.path.suffix else dest.with_suffix("")


def test_merge_refuses_broken_bases(corpus, tmp_path):
    valid = corpus[0]

    def command(case: Case, dest: Path) -> list[str]:
        return ["merge", str(case.path), str(partners(valid, case)[0]), "-o", str(_dest_for(case, dest))]

    check_all(checkpoints(corpus), command, refused, tmp_path)


@pytest.mark.parametrize("side", ["base", "tuned"])
def test_extract_refuses_broken_checkpoints(corpus, tmp_path, side):
    valid = corpus[0]

    def command(case: Case, dest: Path) -> list[str]:
        good = partners(valid, case)[1]
        pair = [case.path, good] if side == "base" else [good, case.path]
        return ["extract", *map(str, pair), "--rank", "2", "-o", str(dest)]

    check_all(checkpoints(corpus), command, refused, tmp_path)


def test_inspect_refuses_broken_bases(corpus, tmp_path):
    valid = corpus[0]

    def command(case: Case, _: Path) -> list[str]:
        return ["inspect", str(partners(valid, case)[0]), "--base", str(case.path)]

    check_all(checkpoints(corpus), command, refused, tmp_path)


# -- a LoRA and a base of different models -----------------------------------------------------------
def test_a_lora_that_does_not_fit_its_base_is_refused(corpus, tmp_path):
    valid = corpus[0]
    pairs = [c for c in corpus[1] if c.role == "pair"]
    assert pairs
    check_all(pairs, lambda c, d: ["merge", str(valid.base), str(c.path), "-o", str(d)], refused, tmp_path)
    for case in pairs:
        result = CliRunner().invoke(main, ["inspect", str(case.path), "--base", str(valid.base), "--strict", "--json"])
        assert result.exit_code == 1, result.output
        assert re.search(case.expect, result.output), result.output


def test_a_lora_for_another_architecture_is_refused(corpus, tmp_path):
    valid = corpus[0]
    pairs = {
        "merge-sdxl-lora-into-sd1": ["merge", str(valid.base), str(valid.sdxl_lora), "-o"],
        "merge-peft-llama-into-sd1": ["merge", str(valid.base), str(valid.peft), "-o"],
        "merge-sd1-lora-into-llama": ["merge", str(valid.llama_dir), str(valid.lora), "-o"],
        "extract-sd1-vs-llama": ["extract", str(valid.base), str(valid.llama_dir), "--rank", "2", "-o"],
        "combine-sd1-with-sdxl": ["combine", str(valid.lora), str(valid.sdxl_lora), "-o"],
    }
    failures = []
    for name, args in pairs.items():
        out = tmp_path / name
        out.mkdir()
        result = run([*args, str(out / "out.safetensors")])
        problems = refusal_problems(result, "arch|model|match|sdxl|sd1|llama|base")
        if list(out.iterdir()):
            problems.append("left files behind")
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)
