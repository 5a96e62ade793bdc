"""Docs that cannot drift: generated sections are current, README's commands are marked for CI, and
the benchmark script still runs (at a tiny size; its numbers are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_formats_doc_matches_the_architecture_tables():
    result = subprocess.run(
        [sys.executable, "docs/make_formats.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_marks_exactly_one_install_and_one_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("<!-- ci:install -->") == 1
    assert readme.count("<!-- ci:test -->") == 1
    install = readme.split("<!-- ci:install -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert "pip install" in install and "loratool inspect fixtures/" in install
    fixture = install.split("loratool inspect ", 1)[1].split()[0]
    assert (ROOT / fixture).exists()


def test_every_doc_linked_from_readme_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for link in (
        "docs/inspect.md",
        "docs/convert.md",
        "docs/merge.md",
        "docs/extract.md",
        "docs/formats.md",
        "docs/architecture.md",
        "docs/benchmarks.md",
        "docs/kinds.md",
        "docs/errors.md",
    ):
        assert f"({link})" in readme
        assert (ROOT / link).is_file()


def test_errors_doc_lists_every_exit_code_and_error_family():
    from loratool import errors

    doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    codes = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert codes == {1, 2, 130, 143}
    for code in {0, *codes}:
        assert f"\n| {code} |" in doc, code
    families = {errors.LoratoolError}
    while True:
        more = {sub for cls in families for sub in cls.__subclasses__()} - families
        if not more:
            break
        families |= more
    for cls in families - {errors.LoratoolError}:
        assert f"(`{cls.__name__}`, exit {cls.exit_code})" in doc, cls.__name__


def run_benchmark(script: str, tmp_path) -> str:
    """A benchmark at a tiny size: it must run; its numbers are not checked here."""
    result = subprocess.run(
        [sys.executable, script, "--size-mb", "2", "--repeat", "1", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_inspect_benchmark_runs(tmp_path):
    stdout = run_benchmark("benchmarks/inspect.py", tmp_path)
    assert "ratio inspect / read:" in stdout
    assert "0 findings" in stdout


def test_convert_benchmark_runs(tmp_path):
    assert run_benchmark("benchmarks/convert.py", tmp_path).count("ratio") == 2


def test_merge_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/merge.py", "--tiny", "--no-peft", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ratio merge / read+write") == 2


def test_extract_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/extract.py", "--tiny", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("x the optimum") == 2
    assert "ratio extract / read both" in result.stdout


@pytest.mark.parametrize("command", ["convert", "combine", "resize"])
def test_readme_examples_run(tmp_path, command):
    """The convert, combine and resize examples in README work as shown (run from a scratch dir
    against the fixtures)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(f"### `loratool {command}", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    for command in commands:
        args = command.split()[1:]
        args = [str(ROOT / a) if a.startswith("fixtures/") else a for a in args]
        result = subprocess.run(
            [sys.executable, "-m", "loratool.cli", *args], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, (command, result.stderr)
