"""mlx-lm adapter folders: `adapters.safetensors` beside mlx's own `adapter_config.json`.

mlx stores each LoRA factor transposed against every torch layout: `lora_a` is (in, r) and
`lora_b` is (r, out), for the update `scale * (x @ lora_a) @ lora_b`. Opening the folder copies the
file once, a tensor at a time, into a temporary safetensors file where `lora_a` is (r, in) and
`lora_b` is (out, r), so everything after the source sees factors in the orientation every other
layout has, and writers copy those bytes unchanged.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .safetensors_file import SafetensorsFile
from .writer import SafetensorsWriter, TensorSpec

MLX_WEIGHTS = "adapters.safetensors"
TRANSPOSED = (".lora_a", ".lora_b")  # stored (in, r) and (r, out)


def is_mlx_config(config: dict) -> bool:
    """mlx-lm's training config, which is no PEFT config: it records `lora_parameters` (and, since
    2024, `fine_tune_type`) where PEFT records `peft_type`."""
    return "peft_type" not in config and ("lora_parameters" in config or "fine_tune_type" in config)


def reoriented_copy(weights: Path) -> tuple[Path, Path]:
    """The adapter's tensors with `lora_a`/`lora_b` transposed to (r, in)/(out, r), in a temporary
    file. Returns (the file, its temporary directory), which the caller removes."""
    directory = Path(tempfile.mkdtemp(prefix="loratool-mlx-"))
    out = directory / weights.name
    try:
        with SafetensorsFile(weights) as source:
            turned = {key for key in source if key.endswith(TRANSPOSED) and len(source.info(key).shape) == 2}
            specs = []
            for key in source:
                info = source.info(key)
                specs.append(TensorSpec(key, info.dtype, info.shape[::-1] if key in turned else info.shape))
            with SafetensorsWriter(out, specs, dict(source.metadata) or None) as writer:
                for spec in specs:
                    tensor = source.load(spec.name)
                    writer.write(spec.name, tensor.T.contiguous() if spec.name in turned else tensor)
                writer.commit()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return out, directory
