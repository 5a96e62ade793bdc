"""One module per on-disk layout, each with its reader (a codec that claims keys and builds the
adapter) and, for the layouts we write, its writer (a `Layout`); detection picks between the readers."""

from .detect import CODECS, Detection, detect_format, read_adapter
from .diffusers import DiffusersLayout
from .kohya import KohyaLayout
from .layout import Entry, Layout, Origin
from .mlx import MlxLayout
from .native import ComfyLayout
from .peft import PeftLayout

# The layouts commands write, by the name `--to` takes.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (KohyaLayout(), DiffusersLayout(), PeftLayout(), MlxLayout(), ComfyLayout())
}

__all__ = ["CODECS", "LAYOUTS", "Detection", "Entry", "Layout", "Origin", "detect_format", "read_adapter"]
