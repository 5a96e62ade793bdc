"""Command line: parse, call the library, render. No math and no file formats here."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__, errors, options
from .failures import error_line, one_line_errors

# The library (and torch with it), the renderers (rich) and the plots are imported by the command
# that runs, never at import: --help, --version and shell completion answer without them.


def _output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--force, --json and --quiet, taken the same way by every command that writes an output."""
    options = (
        click.option("--force", is_flag=True, help="Replace DEST if it exists."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _plot_option(what: str) -> Callable[..., Any]:
    return click.option(
        "--plot", type=click.Path(path_type=str), help=f"Draw {what} to this PNG (needs loratool[plot])."
    )


ALLOW_PICKLE = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read pickle checkpoints (.ckpt/.pt/.pth/.bin), tensors only: torch.load(weights_only=True).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
def main() -> None:
    """Inspect, convert, merge and extract LoRA adapters (SD1.x/2.x, SDXL, Flux, PEFT LLMs)."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--base", type=click.Path(path_type=str), help="Base checkpoint: check shapes and merged values on it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per file on stdout instead of tables.")
@click.option(
    "--header-only",
    is_flag=True,
    help="Read no tensor values: format, architecture, ranks, alphas, dtypes, metadata and the findings "
    "that need no values, at library speed.",
)
@click.option("--strict", is_flag=True, help="Exit 1 when any error-level finding is reported.")
@click.option("--keys", is_flag=True, help="List every module (always present in --json).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_plot_option("per-block ‖ΔW‖ and each module's singular values")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
@ALLOW_PICKLE
@one_line_errors
def inspect(
    paths: tuple[str, ...],
    base: str | None,
    as_json: bool,
    header_only: bool,
    strict: bool,
    keys: bool,
    quiet: bool,
    plot: str | None,
    force: bool,
    allow_pickle: bool,
) -> None:
    """Describe LoRA files or PEFT adapter dirs and report problems in them.

    Several paths, or a folder of LoRAs (searched recursively), give one line per file (one JSON
    line with --json; the full report per file with --keys); a file that cannot be read is reported
    and the scan goes on, exiting 1 at the end.

    \b
    Example:
      loratool inspect my_lora.safetensors --keys
      loratool inspect adapter_dir/ --base model_dir/ --json --strict
      loratool inspect my_lora.safetensors --plot my_lora.png
      loratool inspect ~/loras/ --header-only --json > library.jsonl
    """
    from . import api
    from .plot import check_plot_destination, save_plot
    from .report import print_json_line, progress_bar, render_inspect, stdout_console

    if len(paths) > 1 or api.is_library(Path(paths[0])):
        if plot is not None:
            raise errors.InputError("--plot draws one file's report: give one LoRA")
        _inspect_many(paths, base, as_json, header_only, strict, keys, allow_pickle)
        return
    (path,) = paths
    if plot is not None:
        check_plot_destination(plot, [path, base], force)
    with progress_bar("inspecting", enabled=not quiet and not header_only) as progress:
        report = api.inspect(path, base=base, progress=progress, allow_pickle=allow_pickle, header_only=header_only)
    if plot is not None:
        save_plot(report, plot)
    if as_json:
        print_json_line(report.to_json())
    else:
        render_inspect(report, stdout_console(), show_keys=keys)
    if strict and report.count("error"):
        raise errors.FindingsError(f"{report.count('error')} error-level finding(s) in {path}")


def _inspect_many(
    paths: tuple[str, ...],
    base: str | None,
    as_json: bool,
    header_only: bool,
    strict: bool,
    keys: bool,
    allow_pickle: bool,
) -> None:
    """A library scan: each file's line (or report) as soon as it is done, every failure said. The
    lines are rendered where each report is made (a worker process, in a header-only scan)."""
    from . import api
    from .report import inspect_json_line, inspect_line, print_json_line, render_inspect, stdout_console

    console = stdout_console()
    render = None if keys and not as_json else inspect_json_line if as_json else inspect_line
    done = failed = flagged = 0
    scan = api.inspect_each(paths, base=base, allow_pickle=allow_pickle, header_only=header_only, render=render)
    for scanned in scan:
        done += 1
        if scanned.error is not None and len(paths) == 1 and Path(scanned.path) == Path(paths[0]):
            raise scanned.error  # the one folder given holds no LoRA: unusable input, as one bad file is
        if scanned.error is not None:
            failed += 1
            error_line(scanned.error.message)
            if as_json:
                print_json_line({"path": scanned.path, "error": scanned.error.message})
            continue
        if scanned.report is not None:  # --keys: the full report, rendered here
            flagged += bool(strict and scanned.report.count("error"))
            render_inspect(scanned.report, console, show_keys=True)
        else:
            flagged += bool(strict and scanned.error_findings)
            sys.stdout.write(f"{scanned.text}\n")
        sys.stdout.flush()
    if failed or flagged:
        why = [f"{failed} could not be read"] if failed else []
        why += [f"{flagged} with error-level findings"] if flagged else []
        raise errors.FindingsError(f"{done} files inspected: {', '.join(why)}")


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.option("--to", "to", type=click.Choice(options.TARGET_LAYOUTS), required=True, help="Target layout.")
@click.option(
    "-o",
    "--output",
    "dest",
    type=click.Path(path_type=str),
    required=True,
    help="Output file, or dir (peft, mlx).",
)
@click.option("--arch", type=click.Choice(options.architecture_names()), help="Architecture, when names cannot tell.")
@_output_options
@ALLOW_PICKLE
@one_line_errors
def convert(
    src: str, to: str, dest: str, arch: str | None, force: bool, as_json: bool, quiet: bool, allow_pickle: bool
) -> None:
    """Rewrite a LoRA in another key layout, losslessly.

    Refuses (exit 2, naming the module) anything the target cannot hold.

    \b
    Example:
      loratool convert my_lora.safetensors --to diffusers -o my_lora_diffusers.safetensors
      loratool convert adapter_dir/ --to kohya -o adapter.safetensors
    """
    from . import api
    from .report import print_json, progress_bar, render_convert, stdout_console

    with progress_bar("converting", enabled=not quiet) as progress:
        report = api.convert(src, to, dest, arch=arch, force=force, progress=progress, allow_pickle=allow_pickle)
    if as_json:
        print_json(report.to_json())
    else:
        render_convert(report, stdout_console())


@main.command()
@click.argument("base", type=click.Path(path_type=str))
@click.argument("loras", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "-o", "--output", "dest", type=click.Path(path_type=str), required=True, help="Output file, or dir for a dir base."
)
@click.option(
    "-w", "--weight", "weights", type=float, multiple=True, help="Strength per LoRA, in their order (default 1.0)."
)
@click.option("--device", type=click.Choice(options.DEVICE_CHOICES), default="auto", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(list(options.DTYPE_CHOICES)),
    default="keep",
    show_default=True,
    help="Output float dtype.",
)
@click.option("--allow-unmatched", is_flag=True, help="Merge what matches; skip LoRA modules the base lacks.")
@click.option("--shard-size", help="Re-shard a directory base's weights, e.g. 5GB or 500MiB.")
@_output_options
@ALLOW_PICKLE
@one_line_errors
def merge(
    base: str,
    loras: tuple[str, ...],
    dest: str,
    weights: tuple[float, ...],
    device: str,
    dtype: str,
    allow_unmatched: bool,
    shard_size: str | None,
    force: bool,
    as_json: bool,
    quiet: bool,
    allow_pickle: bool,
) -> None:
    """Bake LoRAs into a base checkpoint: W' = W + weight * (alpha/r) * B @ A.

    BASE is a single-file SD/SDXL/Flux checkpoint, a diffusers folder or an HF model dir. The
    output keeps its layout; tensors no LoRA touches are copied byte for byte. A negative weight
    subtracts a LoRA merged before.

    \b
    Example:
      loratool merge sd15.safetensors style.safetensors -o sd15_style.safetensors
      loratool merge llama_dir/ adapter_dir/ other.safetensors -w 0.7 -w -0.3 -o merged_dir/
    """
    from . import api
    from .report import print_json, progress_bar, render_merge, stdout_console

    size = api.parse_size(shard_size) if shard_size is not None else None
    with progress_bar("merging", enabled=not quiet) as progress:
        report = api.merge(
            base,
            list(loras),
            dest,
            weights=list(weights),
            device=device,
            dtype=dtype,
            allow_unmatched=allow_unmatched,
            shard_size=size,
            force=force,
            progress=progress,
            allow_pickle=allow_pickle,
        )
    if as_json:
        print_json(report.to_json())
    else:
        render_merge(report, stdout_console())


@main.command()
@click.argument("loras", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "-o", "--output", "dest", type=click.Path(path_type=str), required=True, help="Output file, or dir (peft, mlx)."
)
@click.option(
    "-w", "--weight", "weights", type=float, multiple=True, help="Strength per LoRA, in their order (default 1.0)."
)
@click.option("--rank", type=int, help="Best rank-R approximation per module instead of the exact sum.")
@click.option(
    "--to", "to", type=click.Choice(options.TARGET_LAYOUTS), help="Output layout (default: the first LoRA's)."
)
@_output_options
@ALLOW_PICKLE
@one_line_errors
def combine(
    loras: tuple[str, ...],
    dest: str,
    weights: tuple[float, ...],
    rank: int | None,
    to: str | None,
    force: bool,
    as_json: bool,
    quiet: bool,
    allow_pickle: bool,
) -> None:
    """Combine LoRAs of one model into one LoRA: update = sum of weight * update.

    Without --rank the result is exact (ranks add up); with --rank each module is cut to its
    best rank-R approximation.

    \b
    Example:
      loratool combine style.safetensors detail.safetensors -w 0.7 -w 0.5 -o both.safetensors
      loratool combine a.safetensors b.safetensors --rank 32 --to diffusers -o ab_r32.safetensors
    """
    from . import api
    from .report import print_json, progress_bar, render_combine, stdout_console

    with progress_bar("combining", enabled=not quiet) as progress:
        report = api.combine(
            list(loras),
            dest,
            weights=list(weights),
            rank=rank,
            to=to,
            force=force,
            progress=progress,
            allow_pickle=allow_pickle,
        )
    if as_json:
        print_json(report.to_json())
    else:
        render_combine(report, stdout_console())


DYNAMIC_HELP = "Rank per module by a rule: fro:0.9, ratio:20, cumulative:0.9 or eps:1e-3."


@main.command()
@click.argument("base", type=click.Path(path_type=str))
@click.argument("tuned", type=click.Path(path_type=str))
@click.option(
    "-o", "--output", "dest", type=click.Path(path_type=str), required=True, help="Output file, or dir (peft, mlx)."
)
@click.option("--rank", type=int, help="Rank of every module.")
@click.option("--dynamic", help=DYNAMIC_HELP)
@click.option("--max-rank", type=int, help=f"Cap for --dynamic (default {options.DEFAULT_MAX_RANK}).")
@click.option("--conv-rank", type=int, help="Also extract kxk convs (LoCon), at this rank.")
@click.option("--to", "to", type=click.Choice(options.TARGET_LAYOUTS), help="Layout (default kohya; peft for LLMs).")
@click.option("--alpha", type=float, help="Alpha to record (factors rescaled so the update is unchanged).")
@click.option(
    "--min-diff", type=float, default=0.0, show_default=True, help="Skip modules with ||dW||/||W|| at or below this."
)
@click.option(
    "--clamp-quantile", "clamp", type=float, help="kohya's clamp of factor values at this quantile, e.g. 0.99."
)
@click.option("--include", help="Regex on module names (e.g. 'attn|mlp'): extract only these.")
@click.option("--exclude", help="Regex on module names: leave these out.")
@click.option("--exact", is_flag=True, help="Full SVD per module instead of the randomized one.")
@click.option("--device", type=click.Choice(options.DEVICE_CHOICES), default="auto", show_default=True)
@click.option("--modules", "show_modules", is_flag=True, help="List every module's rank, energy and error.")
@_plot_option("the retained energy and rank of every module")
@_output_options
@ALLOW_PICKLE
@one_line_errors
def extract(
    base: str,
    tuned: str,
    dest: str,
    rank: int | None,
    dynamic: str | None,
    max_rank: int | None,
    conv_rank: int | None,
    to: str | None,
    alpha: float | None,
    min_diff: float,
    clamp: float | None,
    include: str | None,
    exclude: str | None,
    exact: bool,
    device: str,
    force: bool,
    show_modules: bool,
    plot: str | None,
    as_json: bool,
    quiet: bool,
    allow_pickle: bool,
) -> None:
    """Extract a LoRA from a fine-tuned checkpoint: truncated SVD of TUNED - BASE per module.

    BASE and TUNED are single files, diffusers folders or HF model dirs of one model.

    \b
    Example:
      loratool extract sd15.safetensors sd15_tuned.safetensors --rank 32 -o tuned_r32.safetensors
      loratool extract llama_dir/ llama_tuned_dir/ --dynamic fro:0.9 --max-rank 64 -o adapter_dir/
      loratool extract sd15.safetensors sd15_tuned.safetensors --rank 16 -o r16.safetensors --plot r16.png
    """
    from . import api
    from .plot import check_plot_destination, save_plot
    from .report import print_json, progress_bar, render_extract, stdout_console

    if plot is not None:
        if Path(plot).resolve() == Path(dest).resolve():
            raise errors.OutputError(f"{plot}: --plot and -o name the same path")
        check_plot_destination(plot, [base, tuned], force)
    with progress_bar("extracting", enabled=not quiet) as progress:
        report = api.extract(
            base,
            tuned,
            dest,
            rank=rank,
            dynamic=dynamic,
            max_rank=max_rank,
            conv_rank=conv_rank,
            to=to,
            alpha=alpha,
            min_diff=min_diff,
            clamp=clamp,
            include=include,
            exclude=exclude,
            exact=exact,
            device=device,
            force=force,
            progress=progress,
            allow_pickle=allow_pickle,
        )
    if plot is not None:
        save_plot(report, plot)
    if as_json:
        print_json(report.to_json())
    else:
        render_extract(report, stdout_console(), show_modules)


@main.command()
@click.argument("lora", type=click.Path(path_type=str))
@click.option(
    "-o", "--output", "dest", type=click.Path(path_type=str), required=True, help="Output file, or dir (peft, mlx)."
)
@click.option("--rank", type=int, help="New rank of every module (modules at or below it are copied).")
@click.option("--dynamic", help=DYNAMIC_HELP)
@click.option("--device", type=click.Choice(options.DEVICE_CHOICES), default="auto", show_default=True)
@click.option("--modules", "show_modules", is_flag=True, help="List every module's ranks, energy and error.")
@_output_options
@ALLOW_PICKLE
@one_line_errors
def resize(
    lora: str,
    dest: str,
    rank: int | None,
    dynamic: str | None,
    device: str,
    force: bool,
    show_modules: bool,
    as_json: bool,
    quiet: bool,
    allow_pickle: bool,
) -> None:
    """Cut a LoRA to a lower rank: the optimal truncation per module, same layout and scale.

    \b
    Example:
      loratool resize big_r128.safetensors --rank 32 -o small_r32.safetensors
      loratool resize adapter_dir/ --dynamic fro:0.95 -o adapter_small/
    """
    from . import api
    from .report import print_json, progress_bar, render_resize, stdout_console

    with progress_bar("resizing", enabled=not quiet) as progress:
        report = api.resize(
            lora,
            dest,
            rank=rank,
            dynamic=dynamic,
            device=device,
            force=force,
            progress=progress,
            allow_pickle=allow_pickle,
        )
    if as_json:
        print_json(report.to_json())
    else:
        render_resize(report, stdout_console(), show_modules)


if __name__ == "__main__":
    main()
