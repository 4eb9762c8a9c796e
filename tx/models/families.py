"""Model families as data: which switches each family uses and how HF weight names map to tx's modules.

A family is a row in :data:`FAMILIES`, not a copy of the model code. The weight map is a table from an
HF key pattern (``{i}`` stands for the layer index) to the path of the tx parameter that holds it.
Per-layer tensors are stacked on a leading layer axis in tx.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tx.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    qk_norm: bool = False
    qkv_bias: Callable[[dict], bool] = lambda cfg: bool(cfg.get("attention_bias", False))
    o_bias: Callable[[dict], bool] = lambda cfg: bool(cfg.get("attention_bias", False))
    sliding_window_key: Callable[[dict], bool] = lambda cfg: False


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), ("llama",)),
    Family(
        "mistral",
        ("MistralForCausalLM",),
        ("mistral",),
        qkv_bias=lambda cfg: False,
        o_bias=lambda cfg: False,
        sliding_window_key=lambda cfg: bool(cfg.get("sliding_window")),
    ),
    Family(
        "qwen2",
        ("Qwen2ForCausalLM",),
        ("qwen2",),
        qkv_bias=lambda cfg: True,
        o_bias=lambda cfg: False,
        sliding_window_key=lambda cfg: bool(cfg.get("use_sliding_window", False)),
    ),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qk_norm=True),
)


def supported() -> str:
    return ", ".join(f"{f.architectures[0]} (model_type {f.model_types[0]!r})" for f in FAMILIES)


def family_for(config: dict, path: str = "config.json") -> Family:
    """Pick the family by ``architectures``, then ``model_type``; otherwise an error listing the supported ones."""
    for arch in config.get("architectures") or ():
        for fam in FAMILIES:
            if arch in fam.architectures:
                return fam
    model_type = config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    found = config.get("architectures") or model_type
    raise CheckpointError(f"{path}: unsupported architecture {found!r}. tx supports: {supported()}")


# HF key -> tx parameter path. "{i}" is the layer index; tx stacks those tensors on axis 0.
# Weights keep HF's [out, in] layout (no transpose on load, PEFT's layout for LoRA).
LAYER_WEIGHTS: dict[str, str] = {
    "model.layers.{i}.input_layernorm.weight": "layers.attn_norm.scale",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.mlp_norm.scale",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.attn.o_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.bias": "layers.attn.o_proj.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.attn.q_norm.scale",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.attn.k_norm.scale",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.mlp.down_proj.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "layers.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.bias": "layers.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.bias": "layers.mlp.down_proj.bias",
}
GLOBAL_WEIGHTS: dict[str, str] = {
    "model.embed_tokens.weight": "embed.embedding",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "lm_head.weight",
}
# The linear projections of a block, in HF module naming: LoRA targets and the PEFT key layout use these.
LINEAR_MODULES: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
