"""HF transformers models, resolved from the file's own module paths.

LLM adapters name modules by their path in the transformers model, so no table of modules is
needed: the path is the canonical name. What a table adds is the family: which model type a set of
paths looks like. That knowledge is data below (path patterns per family), checked by tests against
tiny models built from transformers configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from .base import BaseArchitecture
from .table import Component, FusedSpec, ModuleSpec, kohya_flat

# kohya names an LLM's modules as sd-scripts names text-encoder modules: this prefix, then the path
# with every '.' as '_' (the paths themselves are recorded in the file's metadata to come back).
HF_KOHYA_PREFIX = "lora_te_"


@dataclass(frozen=True)
class HFFamily:
    model_type: str
    patterns: tuple[str, ...]  # regexes a module path of this family matches (searched, not anchored at 0)
    same_names: tuple[str, ...] = ()  # model types whose module paths are identical
    stored_transposed: bool = False  # linear weights saved (in, out): GPT-2's Conv1D


HF_FAMILIES: tuple[HFFamily, ...] = (
    HFFamily(
        "llama",
        (r"layers\.\d+\.self_attn\.[qkvo]_proj$", r"layers\.\d+\.mlp\.(gate|up|down)_proj$"),
        ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo", "cohere", "granite", "starcoder2"),
    ),
    HFFamily("mixtral", (r"layers\.\d+\.self_attn\.[qkvo]_proj$", r"block_sparse_moe\.(gate|experts\.\d+\.w[123])$")),
    HFFamily("phi3", (r"layers\.\d+\.self_attn\.(qkv_proj|o_proj)$", r"layers\.\d+\.mlp\.(gate_up_proj|down_proj)$")),
    HFFamily("phi", (r"layers\.\d+\.self_attn\.([qkv]_proj|dense)$", r"layers\.\d+\.mlp\.fc[12]$")),
    HFFamily("gpt2", (r"\bh\.\d+\.attn\.c_(attn|proj)$", r"\bh\.\d+\.mlp\.c_(fc|proj)$"), stored_transposed=True),
    HFFamily(
        "gpt_neox", (r"layers\.\d+\.attention\.(query_key_value|dense)$", r"layers\.\d+\.mlp\.dense_(h_to_4h|4h_to_h)$")
    ),
    HFFamily(
        "falcon",
        (r"\bh\.\d+\.self_attention\.(query_key_value|dense)$", r"\bh\.\d+\.mlp\.dense_(h_to_4h|4h_to_h)$"),
        ("bloom",),
    ),
    HFFamily("opt", (r"decoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj$", r"decoder\.layers\.\d+\.fc[12]$")),
    HFFamily(
        "bart",
        (
            r"(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.(q|k|v|out)_proj$",
            r"(encoder|decoder)\.layers\.\d+\.fc[12]$",
        ),
        ("whisper", "mbart", "marian", "pegasus", "m2m_100"),
    ),
    HFFamily("gptj", (r"\bh\.\d+\.attn\.(q|k|v|out)_proj$", r"\bh\.\d+\.mlp\.fc_(in|out)$")),
    HFFamily("mpt", (r"blocks\.\d+\.attn\.(Wqkv|out_proj)$", r"blocks\.\d+\.ffn\.(up|down)_proj$")),
    HFFamily("distilbert", (r"layer\.\d+\.attention\.(q|k|v|out)_lin$", r"layer\.\d+\.ffn\.lin[12]$")),
    HFFamily(
        "deberta-v2",
        (
            r"layer\.\d+\.attention\.(self\.(query|key|value)_proj|output\.dense)$",
            r"layer\.\d+\.(intermediate|output)\.dense$",
        ),
    ),
    HFFamily(
        "t5",
        (
            r"block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.[qkvo]$",
            r"block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1|wo)$",
        ),
    ),
    HFFamily(
        "bert",
        (
            r"layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$",
            r"layer\.\d+\.(intermediate|output)\.dense$",
        ),
        ("roberta", "xlm-roberta", "electra", "camembert"),
    ),
    HFFamily("clip", (r"layers\.\d+\.self_attn\.(q|k|v|out)_proj$", r"layers\.\d+\.mlp\.fc[12]$")),
)
COMMON_LEAVES = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out", "shared", "score", "classifier")
# Leaf names of nn.Embedding tables in transformers models (their weight is (num_embeddings, dim)).
EMBEDDING_LEAVES = (
    "embed_tokens",
    "wte",
    "wpe",
    "shared",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_positions",
    "embed_in",
)


@dataclass
class HFArchitecture(BaseArchitecture):
    """A transformers model type; canonical module names are the model's own paths. It lists no
    modules: shapes come from the files, and every module is its own path."""

    lists_modules: ClassVar[bool] = False
    default_layout: ClassVar[str] = "peft"
    kohya_network_module: ClassVar[str] = "networks.lora"
    widened_inputs: ClassVar[tuple[str, ...]] = ()

    name: str
    family: HFFamily | None
    source: str  # how we know: "config" (base config.json), "name" (PEFT base_model_name_or_path), "keys"
    title: str = "HF transformers model"

    @property
    def hints(self) -> dict[str, list[str]]:
        return {}

    @property
    def components(self) -> dict[str, Component]:
        return {}

    @property
    def fused(self) -> dict[str, FusedSpec]:
        return {}

    def spec(self, target: str) -> ModuleSpec | None:
        return None

    def component_label(self, component: str | None) -> str | None:
        return "model"

    def kohya_name(self, target: str) -> str:
        return HF_KOHYA_PREFIX + kohya_flat(target)

    @property
    def candidates(self) -> list[str]:
        if self.family is None:
            return [self.name]
        return [self.family.model_type, *self.family.same_names]


def family_scores(paths: list[str]) -> list[tuple[HFFamily, int]]:
    """How many of `paths` each family's patterns explain, best first. Between families that explain
    as many, the one whose patterns say more of each path wins: OPT's `decoder.layers.N.self_attn.q_proj`
    also fits Llama's `layers.N.self_attn.q_proj`, and a q/v-only adapter must not be read as Llama."""
    scores = []
    for family in HF_FAMILIES:
        rx = [re.compile(p) for p in family.patterns]
        count = specific = 0
        for path in paths:
            spans = [len(m.group(0)) for r in rx if (m := r.search(path)) is not None]
            if spans or path.rsplit(".", 1)[-1] in COMMON_LEAVES:
                count += 1
                specific += max(spans, default=0)
        scores.append((family, count, specific))
    scores.sort(key=lambda s: (-s[1], -s[2]))  # stable: equal scores keep the table's order
    return [(family, count) for family, count, _ in scores]


def detect_hf(paths: list[str], config: dict | None = None, name_hint: str | None = None) -> HFArchitecture | None:
    """Model type from a base config.json if we have one, else from paths, sharpened by a model name
    (PEFT's `base_model_name_or_path`): among the families that explain the paths best, the one the
    name names."""
    if config and isinstance(config.get("model_type"), str):
        model_type = config["model_type"]
        family = next((f for f in HF_FAMILIES if model_type in (f.model_type, *f.same_names)), None)
        return HFArchitecture(model_type, family, "config")
    scored = family_scores(paths)
    best, count = scored[0]
    if count == 0:
        return None
    if name_hint:
        hint = name_hint.lower().replace("-", "").replace("_", "")
        tied = [f for f, n in scored if n == count]
        named = [
            (t, f) for f in tied for t in (f.model_type, *f.same_names) if t.replace("_", "").replace("-", "") in hint
        ]
        if named:
            model_type, family = max(named, key=lambda tf: len(tf[0]))
            return HFArchitecture(model_type, family, "name")
    return HFArchitecture(best.model_type, best, "keys")
