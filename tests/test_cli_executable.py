"""The installed `loratool` executable, run in its own process for every command.

Click's CliRunner calls `main` inside the test process, where stdout and stderr are never
terminals and the console script itself is never used. Here every command runs as the real
executable (the console script next to this interpreter) with its output on pipes, with stderr on a
pseudo-terminal (the progress bar must show), with `--quiet --json` on a pseudo-terminal (nothing
may show, the JSON report must parse) and with a missing input (one error line, exit 2).
Also: `--version`, `--help` with an example on every command, shell completion scripts that
complete, and `inspect` at 80 columns on every shipped fixture.

Every run pays the interpreter and torch start-up, so the runs of a group are launched together
on a thread pool when the first test of the group asks for them; each test waits only for its own.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.metadata
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.cells import cell_len

import loratool

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
KOHYA_SD15 = FIXTURES / "kohya_sd15.safetensors"
DIFFUSERS_SD15 = FIXTURES / "diffusers_sd15.safetensors"
PEFT_LLAMA = FIXTURES / "peft_llama"
sys.path.insert(0, str(ROOT / "tests" / "robustness"))
from corpus import Valid, valid_inputs  # noqa: E402

EXECUTABLE = Path(sys.executable).parent / "loratool"
COMMAND_NAMES = ("inspect", "convert", "merge", "combine", "extract", "resize")
TIMEOUT = 300  # seconds for one run; the inputs are tiny, this only stops a hung run
WORKERS = max(2, os.cpu_count() or 2)
# What rich reads from the environment: the tests set what they need and nothing else leaks in.
RICH_ENVIRONMENT = ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BYTES_COLUMN = re.compile(r"(?P<done>[\d.,]+)/(?P<total>[\d.,]+) (?P<unit>bytes|kB|MB|GB)\b")
SPEED_COLUMN = re.compile(r"[\d.,]+ (?:bytes|kB|MB|GB)/s\b")
TIME_COLUMN = re.compile(r"\b\d+:\d\d:\d\d\b")
DECIMAL_UNITS = {"bytes": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9}


# -- running the executable ------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str  # for a run on a pseudo-terminal: everything the terminal received
    raw_terminal: bytes = b""


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RICH_ENVIRONMENT and not k.startswith("_LORATOOL")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_piped(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    result = subprocess.run(
        [str(EXECUTABLE), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        env=env or environment(),
    )
    return Run(result.returncode, result.stdout, result.stderr)


def run_on_terminal(args: list[str], cwd: Path, columns: int = 100) -> Run:
    """stderr on a pseudo-terminal `columns` wide, stdout to a file; returns what each received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = environment(TERM="xterm-256color", COLUMNS=str(columns))
    stdout_path = cwd / "stdout.txt"
    chunks: list[bytes] = []
    try:
        with open(stdout_path, "wb") as stdout:
            proc = subprocess.Popen(
                [str(EXECUTABLE), *args], stdin=subprocess.DEVNULL, stdout=stdout, stderr=slave, cwd=cwd, env=env
            )
        os.close(slave)
        slave = -1
        deadline = time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait()
                pytest.fail(f"loratool {' '.join(args)} ran past {TIMEOUT} s")
            if not select.select([master], [], [], left)[0]:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError as exc:  # Linux: EIO once the child has closed the terminal's last other end
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
        returncode = proc.wait(timeout=TIMEOUT)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    raw = b"".join(chunks)
    return Run(returncode, stdout_path.read_text(encoding="utf-8"), raw.decode("utf-8", "replace"), raw)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=WORKERS)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)  # runs no test is left to look at are dropped


# -- independent facts about safetensors files -----------------------------------------------------
def header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file, read by hand, and the size of its data section."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(n))
    entries.pop("__metadata__", None)
    return entries, path.stat().st_size - 8 - n


def tensor_names(path: Path) -> list[str]:
    return list(header(path)[0])


def data_bytes(path: Path) -> int:
    return header(path)[1]


def down_shapes(path: Path) -> dict[str, list[int]]:
    """module -> shape of its down (A) factor, for kohya and diffusers/PEFT names alike."""
    shapes = {}
    for name, entry in header(path)[0].items():
        for suffix in (".lora_down.weight", ".lora_A.weight"):
            if name.endswith(suffix):
                shapes[name.removesuffix(suffix)] = entry["shape"]
    return shapes


def module_count(path: Path) -> int:
    return len(down_shapes(path))


# -- the commands ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    name: str
    inputs: Callable[[Valid], list[Path]]
    options: tuple[str, ...]
    writes: bool  # takes -o DEST
    description: str  # the progress bar's label
    unit: str  # what the bar counts
    missing: int  # which input the failing run replaces by a path that does not exist
    # (valid inputs, DEST) -> items and bytes the finished bar must show (bytes None: not checked)
    expected_bar: Callable[[Valid, Path], tuple[int, int | None]]
    check_report: Callable[[dict, Valid, Path], None]  # asserts on the --json report

    def args(self, valid: Valid, dest: Path, *extra: str, missing: Path | None = None) -> list[str]:
        inputs = [str(p) for p in self.inputs(valid)]
        if missing is not None:
            inputs[self.missing] = str(missing)
        return [self.name, *inputs, *self.options, *(["-o", str(dest)] if self.writes else []), *extra]


def check_inspect(doc: dict, valid: Valid, dest: Path) -> None:
    assert doc["path"] == str(valid.lora)
    assert (doc["format"], doc["architecture"]) == ("kohya", "sd1")
    summary = doc["summary"]
    assert summary["tensors"] == len(tensor_names(valid.lora))
    assert summary["file_size"] == valid.lora.stat().st_size
    assert summary["modules"] == len(doc["modules"]) == module_count(valid.lora)
    shapes = down_shapes(valid.lora)
    assert {m["name"]: m["rank"] for m in doc["modules"]} == {name: shape[0] for name, shape in shapes.items()}


def check_convert(doc: dict, valid: Valid, dest: Path) -> None:
    assert doc["source"] == str(KOHYA_SD15)
    assert doc["dest"] == str(dest)
    assert (doc["source_format"], doc["target"], doc["architecture"]) == ("kohya", "diffusers", "sd1")
    assert doc["modules_in"] == doc["modules_out"] == module_count(KOHYA_SD15) == module_count(dest)
    assert all(name.endswith((".lora_A.weight", ".lora_B.weight")) for name in tensor_names(dest))
    assert doc["tensors_copied"] + doc["tensors_computed"] == len(tensor_names(dest))
    assert doc["bytes_written"] == data_bytes(dest)


def check_merge(doc: dict, valid: Valid, dest: Path) -> None:
    assert (doc["base"], doc["dest"], doc["dtype"]) == (str(valid.base), str(dest), "keep")
    [lora] = doc["loras"]
    assert (lora["path"], lora["strength"], lora["format"], lora["architecture"]) == (
        str(valid.lora),
        1.0,
        "kohya",
        "sd1",
    )
    assert lora["matched"] == lora["modules"] == module_count(valid.lora)
    assert lora["unmatched"] == []
    assert tensor_names(dest) == tensor_names(valid.base)
    assert doc["tensors_updated"] >= module_count(valid.lora)
    assert doc["tensors_updated"] + doc["tensors_copied"] + doc["tensors_cast"] == len(tensor_names(dest))
    assert doc["tensors_cast"] == 0
    assert (doc["files_written"], doc["bytes_written"]) == (1, data_bytes(dest))


def check_combine(doc: dict, valid: Valid, dest: Path) -> None:
    assert doc["sources"] == [str(KOHYA_SD15), str(DIFFUSERS_SD15)]
    assert doc["weights"] == [1.0, 1.0]
    assert (doc["dest"], doc["target"], doc["architecture"], doc["rank"]) == (str(dest), "kohya", "sd1", None)
    assert doc["modules_out"] == module_count(dest)
    assert all(name.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for name in tensor_names(dest))
    # Exact sum: every module of either LoRA is written once; shared ones once for both.
    assert doc["modules_out"] == module_count(KOHYA_SD15) + module_count(DIFFUSERS_SD15) - doc["modules_shared"]
    assert doc["modules_shared"] > 0
    assert doc["bytes_written"] == data_bytes(dest)


def check_extract(doc: dict, valid: Valid, dest: Path) -> None:
    assert (doc["base"], doc["tuned"], doc["dest"]) == (str(valid.base), str(valid.tuned), str(dest))
    assert (doc["target"], doc["architecture"], doc["method"]) == ("kohya", "sd1", "rank 4")
    assert doc["skipped"] == []  # every weight of the tuned checkpoint moved
    shapes = down_shapes(dest)
    assert {m["name"]: m["rank"] for m in doc["modules"]} == {name: 4 for name in shapes}
    assert all(shape[0] == 4 for shape in shapes.values())
    assert all(0.0 < m["retained"] <= 1.0 and m["relative_error"] >= 0.0 for m in doc["modules"])
    assert doc["bytes_written"] == data_bytes(dest)


def check_resize(doc: dict, valid: Valid, dest: Path) -> None:
    assert (doc["source"], doc["dest"], doc["target"], doc["method"]) == (
        str(valid.lora),
        str(dest),
        "kohya",
        "rank 2",
    )
    before, after = down_shapes(valid.lora), down_shapes(dest)
    assert {m["name"]: (m["rank_in"], m["rank_out"]) for m in doc["modules"]} == {
        name: (shape[0], min(2, shape[0])) for name, shape in before.items()
    }
    assert {name: shape[0] for name, shape in after.items()} == {name: min(2, s[0]) for name, s in before.items()}
    assert doc["bytes_written"] == data_bytes(dest)


COMMANDS = {
    c.name: c
    for c in (
        Command(
            "inspect",
            lambda v: [v.lora],
            (),
            False,
            "inspecting",
            "tensors",
            0,
            lambda v, dest: (len(tensor_names(v.lora)), data_bytes(v.lora)),
            check_inspect,
        ),
        Command(
            "convert",
            lambda v: [KOHYA_SD15],
            ("--to", "diffusers"),
            True,
            "converting",
            "tensors",
            0,
            lambda v, dest: (len(tensor_names(dest)), data_bytes(dest)),
            check_convert,
        ),
        Command(
            "merge",
            lambda v: [v.base, v.lora],
            (),
            True,
            "merging",
            "tensors",
            1,
            lambda v, dest: (len(tensor_names(dest)), data_bytes(dest)),
            check_merge,
        ),
        Command(
            "combine",
            lambda v: [KOHYA_SD15, DIFFUSERS_SD15],
            (),
            True,
            "combining",
            "tensors",
            1,
            lambda v, dest: (len(tensor_names(dest)), data_bytes(dest)),
            check_combine,
        ),
        Command(
            "extract",
            lambda v: [v.base, v.tuned],
            ("--rank", "4"),
            True,
            "extracting",
            "modules",
            1,
            lambda v, dest: (module_count(dest), None),
            check_extract,
        ),
        Command(
            "resize",
            lambda v: [v.lora],
            ("--rank", "2"),
            True,
            "resizing",
            "modules",
            0,
            lambda v, dest: (module_count(v.lora), None),
            check_resize,
        ),
    )
}
assert tuple(COMMANDS) == COMMAND_NAMES


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    return valid_inputs(tmp_path_factory.mktemp("valid"))


MODES = ("piped", "terminal", "quiet", "missing")
# Terminal width for the runs on a pseudo-terminal: inspect's terminal output, bar included, must read at 80.
TERMINAL_COLUMNS = {name: 80 if name == "inspect" else 100 for name in COMMAND_NAMES}


@dataclass(frozen=True)
class CommandRun:
    future: Future[Run]
    dest: Path
    missing: Path

    def result(self) -> Run:
        return self.future.result()


@pytest.fixture(scope="module")
def command_runs(pool, valid, tmp_path_factory) -> dict[tuple[str, str], CommandRun]:
    """(command, mode) -> its run, each in a fresh directory that is also its working directory.

    piped: stdout and stderr on pipes. terminal: stderr on a pseudo-terminal. quiet: the same with
    --quiet --json. missing: piped, one input replaced by a path that does not exist.
    """
    runs = {}
    for name, command in COMMANDS.items():
        for mode in MODES:
            work = tmp_path_factory.mktemp(f"{name}-{mode}")
            dest, missing = work / "out.safetensors", work / "missing.safetensors"
            if mode == "piped":
                future = pool.submit(run_piped, command.args(valid, dest), work)
            elif mode == "terminal":
                future = pool.submit(run_on_terminal, command.args(valid, dest), work, TERMINAL_COLUMNS[name])
            elif mode == "quiet":
                future = pool.submit(run_on_terminal, command.args(valid, dest, "--quiet", "--json"), work)
            else:
                future = pool.submit(run_piped, command.args(valid, dest, missing=missing), work)
            runs[name, mode] = CommandRun(future, dest, missing)
    return runs


def succeeded(run: Run, command: Command, dest: Path) -> None:
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    if command.writes:
        assert dest.is_file()
        assert [p.name for p in dest.parent.iterdir() if p.name != "stdout.txt"] == [dest.name]  # no temporaries


# -- the executable, --version and --help ----------------------------------------------------------
def test_executable_is_the_installed_console_script():
    assert EXECUTABLE.is_file(), f"{EXECUTABLE}: no console script; is loratool installed in this venv?"
    assert os.access(EXECUTABLE, os.X_OK)
    [script] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "loratool"]
    assert script.value == "loratool.cli:main"
    assert importlib.metadata.version("loratool") == loratool.__version__


@pytest.fixture(scope="module")
def info_runs(pool) -> dict[str, Future[Run]]:
    """--version, --help and every command's --help; the completion scripts and completions."""
    jobs: dict[str, list[str]] = {"--version": ["--version"], "--help": ["--help"]}
    jobs |= {name: [name, "--help"] for name in COMMAND_NAMES}
    futures = {key: pool.submit(run_piped, args) for key, args in jobs.items()}
    for shell in ("bash", "zsh", "fish"):
        futures[f"{shell}_source"] = pool.submit(run_piped, [], None, environment(_LORATOOL_COMPLETE=f"{shell}_source"))
    for key, words, cword in (
        ("complete command", "loratool con", "1"),
        ("complete layout", "loratool convert x --to ", "4"),
        ("complete option", "loratool resize x --ra", "3"),
    ):
        env = environment(_LORATOOL_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=cword)
        futures[key] = pool.submit(run_piped, [], None, env)
    return futures


def test_version(info_runs):
    run = info_runs["--version"].result()
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout == f"loratool, version {loratool.__version__}\n"


def test_main_help_lists_every_command(info_runs):
    run = info_runs["--help"].result()
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout.startswith("Usage: loratool ")
    listed = run.stdout.split("\nCommands:\n", 1)[1]
    assert sorted(line.split()[0] for line in listed.splitlines() if line.strip()) == sorted(COMMAND_NAMES)
    assert "--version" in run.stdout


def example_lines(help_text: str) -> list[str]:
    lines = help_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Example:"]
    assert len(starts) == 1, help_text
    examples = []
    for line in lines[starts[0] + 1 :]:
        if not line.strip():
            break
        examples.append(line.strip())
    return examples


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_command_help_has_a_working_example(info_runs, name):
    run = info_runs[name].result()
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout.startswith(f"Usage: loratool {name} ")
    examples = example_lines(run.stdout)
    assert examples, run.stdout
    options = run.stdout.split("\nOptions:\n", 1)[1]
    for example in examples:
        assert example.startswith(f"loratool {name} "), example
        # Every option an example uses is one the command takes.
        for option in re.findall(r"(?<!\S)(--?[A-Za-z][\w-]*)", example):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", options), (example, option)


# -- shell completion ------------------------------------------------------------------------------
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script(info_runs, shell):
    run = info_runs[f"{shell}_source"].result()
    assert (run.returncode, run.stderr) == (0, "")
    assert "loratool" in run.stdout
    # The script calls the program back for each completion.
    assert f"_LORATOOL_COMPLETE={shell}_complete" in run.stdout


def completions(run: Run) -> list[str]:
    assert (run.returncode, run.stderr) == (0, "")
    kinds_values = [line.split(",", 1) for line in run.stdout.splitlines()]
    assert all(kind == "plain" for kind, _ in kinds_values), run.stdout
    return [value for _, value in kinds_values]


def test_completion_of_a_command_name(info_runs):
    assert completions(info_runs["complete command"].result()) == ["convert"]


def test_completion_of_layout_choices(info_runs):
    layouts = ["comfyui", "diffusers", "kohya", "mlx", "peft"]
    assert sorted(completions(info_runs["complete layout"].result())) == layouts


def test_completion_of_an_option(info_runs):
    assert completions(info_runs["complete option"].result()) == ["--rank"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_script_completes_in_bash(info_runs, tmp_path):
    """Source the script in a real bash and call the function bash would call on <TAB>."""
    script = tmp_path / "loratool.bash"
    script.write_text(info_runs["bash_source"].result().stdout, encoding="utf-8")
    probe = (
        f'source "{script}"\n'
        "complete -p loratool\n"
        'COMP_WORDS=(loratool convert x --to ""); COMP_CWORD=4\n'
        "_loratool_completion loratool\n"
        'printf "reply:%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = environment(PATH=f"{EXECUTABLE.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", probe], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("complete ") and lines[0].endswith(" _loratool_completion loratool")
    assert sorted(line.removeprefix("reply:") for line in lines[1:]) == ["comfyui", "diffusers", "kohya", "mlx", "peft"]


# -- every command, as the executable --------------------------------------------------------------
@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_command_with_pipes_prints_report_and_no_bar(command_runs, name):
    command, entry = COMMANDS[name], command_runs[name, "piped"]
    run = entry.result()
    succeeded(run, command, entry.dest)
    assert run.stderr == ""  # no bar, no control sequences, nothing else when stderr is not a terminal
    assert run.stdout.strip()
    assert "\x1b" not in run.stdout
    assert command.description not in run.stdout


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_command_json_report_quiet_on_a_terminal(command_runs, valid, name):
    """--quiet --json with stderr on a terminal: the terminal receives nothing, stdout is the report."""
    command, entry = COMMANDS[name], command_runs[name, "quiet"]
    run = entry.result()
    succeeded(run, command, entry.dest)
    assert run.raw_terminal == b""
    doc = json.loads(run.stdout)
    assert isinstance(doc, dict)
    command.check_report(doc, valid, entry.dest)


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_command_missing_input_is_one_error_line(command_runs, name):
    entry = command_runs[name, "missing"]
    run = entry.result()
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    assert run.stderr.endswith("\n") and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("loratool: error: ")
    assert str(entry.missing) in run.stderr
    assert not entry.dest.exists()


def bar_frames(terminal: str) -> list[str]:
    """The successive redraws of the bar, as text."""
    text = ANSI.sub("", terminal)
    return [frame.strip() for frame in re.split(r"[\r\n]+", text) if frame.strip()]


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_command_progress_bar_on_a_terminal(command_runs, valid, name):
    command, entry = COMMANDS[name], command_runs[name, "terminal"]
    run = entry.result()
    succeeded(run, command, entry.dest)
    assert run.stdout.strip() and "\x1b" not in run.stdout  # the report still goes to stdout, plain
    frames = bar_frames(run.stderr)
    assert frames, run.raw_terminal
    assert all(frame.startswith(command.description + " ") for frame in frames), frames
    assert max(cell_len(frame) for frame in frames) <= TERMINAL_COLUMNS[name], frames

    items, nbytes = command.expected_bar(valid, entry.dest)
    counts = [
        (int(done), int(total))
        for frame in frames
        for done, total in re.findall(rf"(\d+)/(\d+) {command.unit}\b", frame)
    ]
    assert counts, frames
    assert {total for _, total in counts} == {items}, counts
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)
    assert counts[-1] == (items, items), counts

    final = next(frame for frame in reversed(frames) if f" {items}/{items} {command.unit}" in frame)
    column = BYTES_COLUMN.search(final)
    assert column, final
    assert column["done"] == column["total"], final
    assert SPEED_COLUMN.search(final), final
    assert TIME_COLUMN.search(final), final
    if nbytes is not None:
        unit = DECIMAL_UNITS[column["unit"]]
        shown = float(column["total"].replace(",", "")) * unit
        assert abs(shown - nbytes) <= (0 if unit == 1 else 0.06 * unit), (final, nbytes)  # shown to 1 decimal

    # Transient: the bar's line is erased after its last redraw.
    last_draw = run.raw_terminal.rindex(f"{items}/{items} {command.unit}".encode())
    assert b"\x1b[2K" in run.raw_terminal[last_draw:], run.raw_terminal[last_draw:]


# -- inspect at 80 columns -------------------------------------------------------------------------
INSPECTED = [*sorted(p.name for p in FIXTURES.glob("*.safetensors")), PEFT_LLAMA.name]


@pytest.fixture(scope="module")
def narrow_runs(pool, valid) -> dict[tuple[str, str], Future[Run]]:
    """(input, "" | "--keys") -> `loratool inspect INPUT` with COLUMNS=80 and stdout on a pipe."""
    env = environment(COLUMNS="80")
    targets = {name: [str(FIXTURES / name)] for name in INSPECTED}
    targets["base"] = [str(valid.lora), "--base", str(valid.base)]
    return {
        (name, keys): pool.submit(run_piped, ["inspect", *args, *([keys] if keys else [])], None, env)
        for name, args in targets.items()
        for keys in ("", "--keys")
    }


def assert_fits_80_columns(run: Run) -> None:
    assert (run.returncode, run.stderr) == (0, ""), run.stderr
    lines = run.stdout.splitlines()
    assert lines
    too_wide = [line for line in lines if cell_len(line) > 80]
    assert not too_wide, too_wide
    assert "…" not in run.stdout  # nothing cut short: long names fold onto the next line instead


@pytest.mark.parametrize("keys", ["", "--keys"], ids=["summary", "keys"])
@pytest.mark.parametrize("name", INSPECTED)
def test_inspect_fits_80_columns(narrow_runs, name, keys):
    assert_fits_80_columns(narrow_runs[name, keys].result())


@pytest.mark.parametrize("keys", ["", "--keys"], ids=["summary", "keys"])
def test_inspect_with_base_fits_80_columns(narrow_runs, valid, keys):
    run = narrow_runs["base", keys].result()
    assert_fits_80_columns(run)
    assert any(line.split()[:1] == ["base"] for line in run.stdout.splitlines())


# -- a reader that stops early ----------------------------------------------------------------------
@pytest.mark.parametrize("extra", [(), ("--json",)])
def test_stdout_closed_early_exits_141_without_a_word(extra):
    """`loratool inspect x --keys | head -1`: once the reader has gone, no traceback and no
    "unexpected BrokenPipeError", just SIGPIPE's exit code."""
    process = subprocess.Popen(
        [str(EXECUTABLE), "inspect", str(FIXTURES / "kohya_sdxl.safetensors"), "--keys", *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(COLUMNS="80"),
    )
    process.stdout.close()  # before anything is printed: the first write fails
    stderr = process.stderr.read()
    assert process.wait(timeout=TIMEOUT) == 141
    assert stderr == b""
