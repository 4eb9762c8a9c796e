"""ModelConfig: what the decoder needs to know, parsed from a checkpoint's config.json (no transformers)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tx.errors import CheckpointError
from tx.jsonfile import read_json_object


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding parameters. `kind` is one of "default", "linear", "llama3"."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A mixture-of-experts MLP: a router picks ``top_k`` of ``num_experts`` gated experts per token.

    ``router``: "softmax_topk" (softmax over all experts, then top-k; Qwen-MoE, Mixtral) or "topk_softmax" (top-k
    of the logits, then a softmax over those k; gpt-oss). ``norm_topk_prob`` renormalises the chosen weights to sum
    1. ``router_bias`` / ``expert_bias``: biases on the router and the experts (gpt-oss). ``activation``: "silu"
    (gate rows then up rows) or "clamped_swiglu" (gpt-oss: interleaved rows, ``swiglu_alpha``, ``swiglu_limit``).
    ``shared_expert_size`` > 0 adds an always-on gated MLP of that width with a sigmoid gate (Qwen2-MoE).
    ``router_aux_loss_coef``: weight of the load-balancing loss (0: none).
    """

    num_experts: int
    top_k: int
    expert_size: int
    router: str = "softmax_topk"
    norm_topk_prob: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    router_aux_loss_coef: float = 0.0


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What one decoder layer is made of. Hashable: layers with equal specs share one compiled layer.

    ``mlp``: "dense" (gated MLP) or "moe" (:class:`MoEConfig`). ``window``: this layer's sliding-window size
    (None: full attention).
    """

    mlp: str = "dense"
    window: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and switches of a dense decoder-only transformer.

    The per-family switches (`qkv_bias`, `o_bias`, `qk_norm`, ...) are filled in by the family
    table in :mod:`tx.models.families`; everything else comes from config.json.
    """

    family: str
    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    moe: MoEConfig | None = None
    layer_specs: tuple[BlockSpec, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.layer_specs:  # every layer alike: dense MLP, the config's window
            object.__setattr__(self, "layer_specs", (BlockSpec(window=self.sliding_window),) * self.num_layers)
        if len(self.layer_specs) != self.num_layers:
            raise CheckpointError(f"{len(self.layer_specs)} layer specs for {self.num_layers} layers")


def read_config_json(folder: Path) -> dict[str, Any]:
    """Read and minimally validate ``folder/config.json``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json; a checkpoint folder needs config.json and *.safetensors "
            "(as written by transformers' save_pretrained)"
        )
    return read_json_object(path, CheckpointError)


def _get(data: dict, key: str, kind: type | tuple, path: str, default: Any = dataclasses.MISSING) -> Any:
    if key not in data or data[key] is None:
        if default is dataclasses.MISSING:
            raise CheckpointError(f"{path}: missing required key {key!r}")
        return default
    value = data[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise CheckpointError(f"{path}: {key!r} must be a number, found {value!r}")
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CheckpointError(f"{path}: {key!r} must be {want}, found {value!r} ({type(value).__name__})")
    if kind is int and value <= 0 and key not in ("bos_token_id", "eos_token_id", "pad_token_id"):
        raise CheckpointError(f"{path}: {key!r} must be positive, found {value}")
    return value


def parse_rope(data: dict, path: str) -> RopeConfig:
    """Both layouts: transformers 5 ``rope_parameters`` and the older ``rope_theta`` + ``rope_scaling``."""
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type layout
        params = params["full_attention"]
    if not isinstance(params, dict):
        params = dict(data.get("rope_scaling") or {})
        params.setdefault("rope_theta", data.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{path}: rope type {kind!r} is not supported; supported: default, linear, llama3")
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=int(params.get("original_max_position_embeddings", 8192)),
    )


def parse_config(data: dict[str, Any], path: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from a config.json dict; the family decides the switches."""
    from tx.models.families import family_for

    family = family_for(data, path)
    hidden = _get(data, "hidden_size", int, path)
    heads = _get(data, "num_attention_heads", int, path)
    kv_heads = _get(data, "num_key_value_heads", int, path, heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = _get(data, "head_dim", int, path, None)
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"{path}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    act = data.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{path}: hidden_act {act!r} is not supported (tx's gated MLP uses silu)")
    window = data.get("sliding_window") if family.sliding_window_key(data) else None
    num_layers = _get(data, "num_hidden_layers", int, path)
    moe = family.moe(data, path) if family.moe else None
    specs = family.layer_specs(data, num_layers, int(window) if window else None, path)
    return ModelConfig(
        family=family.name,
        model_type=data.get("model_type", family.model_types[0]),
        architecture=(data.get("architectures") or [family.architectures[0]])[0],
        vocab_size=_get(data, "vocab_size", int, path),
        hidden_size=hidden,
        intermediate_size=_get(data, "intermediate_size", int, path),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_get(data, "rms_norm_eps", (int, float), path, 1e-6)),
        max_positions=_get(data, "max_position_embeddings", int, path, 4096),
        rope=parse_rope(data, path),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias(data),
        o_bias=family.o_bias(data),
        mlp_bias=bool(data.get("mlp_bias", False)),
        qk_norm=family.qk_norm,
        sliding_window=int(window) if window else None,
        moe=moe,
        layer_specs=specs,
        bos_token_id=data.get("bos_token_id"),
        eos_token_id=data.get("eos_token_id"),
        pad_token_id=data.get("pad_token_id"),
        torch_dtype=data.get("dtype", data.get("torch_dtype")),
        raw=data,
    )


def load_config(folder: Path) -> ModelConfig:
    return parse_config(read_config_json(folder), str(Path(folder) / "config.json"))
