"""How long the command line takes to answer when there is no arithmetic to do.

    python benchmarks/startup.py [--runs 10]

Times, as a user's shell runs them (a fresh process each time, wall clock): `loratool --help`,
`loratool inspect --help`, `loratool --version`, one press of Tab (bash completion of
`loratool convert x --to `), and for comparison `python -c pass` and `python -c "import torch"`.
Each is run `--runs` times; the first run after the page cache is dropped is the cold start (when
this process may drop it: root on Linux), the median of the rest the warm one. Prints each median
against the 0.3 s target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 0.3


def contenders() -> dict[str, tuple[list[str], dict[str, str]]]:
    loratool = shutil.which("loratool") or "loratool"
    complete = {"_LORATOOL_COMPLETE": "bash_complete", "COMP_WORDS": "loratool convert x --to ", "COMP_CWORD": "4"}
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], {}),
        "python -c 'import torch'": ([sys.executable, "-c", "import torch"], {}),
        "loratool --help": ([loratool, "--help"], {}),
        "loratool inspect --help": ([loratool, "inspect", "--help"], {}),
        "loratool --version": ([loratool, "--version"], {}),
        "completion (Tab)": ([loratool], complete),
    }


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env={**os.environ, **env}, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print(f"{'command':28} {'cold':>8} {'warm (median)':>14}")
    for name, (argv, env) in contenders().items():
        cold = timed(argv, env) if drop_page_cache() else None
        warm = statistics.median(timed(argv, env) for _ in range(args.runs))
        cold_text = f"{cold:.3f} s" if cold is not None else "n/a"
        verdict = (
            ""
            if name.startswith("python")
            else f"  (target < {TARGET_SECONDS} s: {'met' if warm < TARGET_SECONDS else 'NOT met'})"
        )
        print(f"{name:28} {cold_text:>8} {warm:>12.3f} s{verdict}")


if __name__ == "__main__":
    main()
