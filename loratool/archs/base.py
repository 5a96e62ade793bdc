"""What every architecture answers, whether a generated table lists its modules (SD, SDXL, Flux) or a
transformers family only recognises module paths (Llama, GPT-2, ...).

Code outside `archs/` asks these questions and never which kind of architecture it holds: a table
answers from its rows, an HF family with the neutral answer (no components, no fused weights, no
row quirks, the module path as the name). A new kind of architecture implements this class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .table import Component, FusedSpec, ModuleSpec, Targets


class BaseArchitecture(ABC):
    name: str
    title: str
    # True when every module is known with its full-size shape (a table); False when only module
    # paths are recognised, so shapes come from the files and paths are recorded beside any name
    # that does not spell them out.
    lists_modules: ClassVar[bool]
    hints: Mapping[str, list[str]]  # metadata key -> value prefixes that name it (ss_base_model_version, ...)
    components: Mapping[str, Component]  # separately loaded models (unet, text_encoder, ...); none for one model
    fused: Mapping[str, FusedSpec]  # weights stored as one tensor of several modules' row blocks (Flux qkv)
    kohya_network_module: str  # the sd-scripts network module a kohya LoRA of it records (ss_network_module)
    widened_inputs: tuple[str, ...]  # input layers a LoRA may widen (Flux img_in); see `widens`

    @property
    def base_model_version(self) -> str | None:
        """The value kohya writes as ss_base_model_version for this architecture, if it has one."""
        values = self.hints.get("ss_base_model_version")
        return values[0] if values else None

    @property
    def candidates(self) -> list[str] | None:
        """Model types this one could equally be (only transformers families share module paths)."""
        return None

    @property
    def default_layout(self) -> str:
        """The layout a LoRA of this model is written in when the user names none."""
        return "kohya"

    # -- one module ----------------------------------------------------------------------------------------
    @abstractmethod
    def spec(self, target: str) -> ModuleSpec | None:
        """The table row of a canonical module, or None where modules are not listed."""

    def component_of(self, target: str) -> str | None:
        spec = self.spec(target)
        return spec.component if spec is not None else None

    @abstractmethod
    def component_label(self, component: str | None) -> str | None:
        """The short name reports use for a component (te1, unet, transformer; `model` for an LLM)."""

    def optional_levels(self, component: str | None) -> tuple[str, ...]:
        """Path levels some writers leave out (transformers 5 dropped `text_model.` from CLIP)."""
        return ()

    def swaps_rows(self, target: str) -> bool:
        """Whether the module's output rows come in two halves whose order single files and
        diffusers disagree on (Flux's final modulation: (shift, scale) against (scale, shift))."""
        spec = self.spec(target)
        return spec is not None and spec.rows == "swap_halves"

    def widens(self, target: str) -> bool:
        """Whether a LoRA may give this input layer more input channels than the model has (Flux's
        img_in for control and fill LoRAs); the base weight is then widened with zero columns."""
        return target in self.widened_inputs

    def widened_model(self, target: str, columns: int) -> str | None:
        """The model whose LoRAs give `target` this many input columns (FLUX.1 Fill: 384), if known."""
        return getattr(self, "widened_models", {}).get(target, {}).get(columns)

    def module_path(self, target: str) -> str:
        """The module's path inside the model it belongs to (what PEFT wraps and names)."""
        spec = self.spec(target)
        return spec.path if spec is not None else target

    # -- fused weights ---------------------------------------------------------------------------------
    def fused_group(self, targets: Targets) -> FusedSpec | None:
        """The fused weight whose row blocks are exactly `targets` in order, if there is one."""
        return None

    def fused_group_of(self, target: str) -> FusedSpec | None:
        """The fused weight a module is one row block of, if any."""
        return None

    def comfyui_name(self, targets: Targets) -> str | None:
        """The module name ComfyUI reads for these targets (None: ComfyUI loads no such model)."""
        return None

    # -- names in kohya files ----------------------------------------------------------------------------
    @abstractmethod
    def kohya_name(self, target: str) -> str:
        """The name kohya, A1111 and ComfyUI expect; KeyError when the module has none of its own."""

    @property
    def kohya_native_names(self) -> frozenset[str]:
        """kohya names built from single-file paths (their factor rows follow that file's order)."""
        return frozenset()
