"""ModelConfig: what the decoder needs to know, parsed from a checkpoint's config.json (no transformers)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tx.errors import CheckpointError, ConfigError
from tx.jsonfile import read_json_object
from tx.models.rope import RopeConfig, parse_rope  # noqa: F401 - RopeConfig: imported from here too


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
    # DeepSeek routing (router "grouped"): ``scoring`` "sigmoid" (V3) or "softmax" (V2) of the fp32 logits; the
    # choice adds ``correction_bias`` (V3's e_score_correction_bias) to the scores, keeps the ``topk_group`` best of
    # ``n_group`` expert groups (a group's score: "top2_sum" of its two best (V3) or its "max" (V2)), then the top-k
    # of those; the weights are the uncorrected scores (renormalised with ``norm_topk_prob``) times
    # ``routed_scaling_factor``.
    scoring: str = "softmax"
    correction_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    routed_scaling_factor: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 / V3): queries from ``q_proj`` or the low-rank path ``q_a_proj`` ->
    RMSNorm -> ``q_b_proj`` (``q_lora_rank`` set); keys and values from one latent of ``kv_lora_rank`` numbers per
    token (``kv_a_proj_with_mqa`` -> RMSNorm -> ``kv_b_proj``) plus one rope key of ``qk_rope_head_dim`` shared by
    every head. Query / key heads are ``qk_nope_head_dim + qk_rope_head_dim`` wide, value heads ``v_head_dim``.
    ``rope_interleave``: the rope channels come as interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressedAttentionConfig:
    """DeepSeek-V4's attention (:mod:`tx.models.compressed`): a low-rank query (``q_lora_rank``), one key/value
    head of ``head_dim`` shared as key and value, interleaved rope on its trailing ``rope_dim`` channels, a grouped
    low-rank output projection (``o_groups`` groups, ``o_lora_rank`` each), a per-head sink and a sliding window on
    every layer; CSA layers add entries compressed every ``csa_rate`` tokens (overlapping windows) chosen per query by
    the Lightning indexer (``index_heads`` x ``index_head_dim``, top ``index_topk``), HCA layers entries compressed
    every ``hca_rate`` tokens, all of them visible."""

    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    csa_rate: int
    hca_rate: int
    index_heads: int
    index_head_dim: int
    index_topk: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperConfig:
    """Hyper-connections a checkpoint's blocks carry (DeepSeek-V4's mHC): ``n`` streams, Sinkhorn with ``iters``
    iterations and ``eps``, the streams' RMS norm with ``norm_eps``. tx runs them as its "mhc" connector."""

    n: int
    iters: int
    eps: float
    norm_eps: float


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What one decoder layer is made of. Hashable: layers with equal specs share one compiled layer.

    ``mlp``: "dense" (gated MLP) or "moe" (:class:`MoEConfig`). ``window``: this layer's sliding-window size
    (None: full attention). ``rope``: key of this layer's rotary embedding in :attr:`ModelConfig.ropes` (None: the
    layer has no rope, as SmolLM3's NoPE layers).
    """

    mlp: str = "dense"
    window: int | None = None
    rope: str | None = "default"
    attn: str | None = None  # DeepSeek-V4's attention kind: "sliding", "csa" or "hca" (None: the family's one kind)
    router: str | None = None  # "hash": DeepSeek-V4's hash routing (tid2eid of the token ids); None: learned top-k


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and switches of a dense decoder-only transformer.

    The per-family switches (`qkv_bias`, `o_bias`, `qk_norm`, ...) are filled in by the family
    table in :mod:`tx.models.families`; everything else comes from config.json.

    Block options (defaults: a Llama block; an option left at its default adds no op):

    - ``hidden_act``: "silu" (SwiGLU), "gelu_tanh" (GeGLU, Gemma), "gelu".
    - ``norm_placement``: "pre" (``h + F(norm(h))``), "sandwich" (Gemma: ``h + post_norm(F(pre_norm(h)))``),
      "post" (OLMo 2: ``h + norm(F(h))``). ``norm_offset`` 1.0: the norm scales by ``1 + w`` (Gemma);
      ``norm_fp32_scale``: the scale multiplies in fp32 before the cast back (Gemma, OLMo 2).
    - ``qk_norm_scope``: "head" (an RMSNorm over each head, Qwen3 / Gemma 3) or "proj" (over the whole q / k
      projection, OLMo 2).
    - ``fused_qkv`` / ``fused_gate_up``: one ``qkv_proj`` [(H + 2K) D, C] and one ``gate_up_proj`` [2I, C] (Phi-3).
    - ``embed_scale``: embeddings times it (Gemma's sqrt(hidden), rounded to the compute dtype when
      ``embed_scale_in_dtype``; Granite's ``embedding_multiplier`` in fp32). ``residual_multiplier``: each branch
      times it (Granite). ``attn_scale``: the attention logit scale (None: head_dim ** -0.5).
      ``attn_softcap`` / ``final_softcap``: ``cap * tanh(x / cap)`` on attention / final logits (Gemma 2).
      ``logits_divisor``: final logits divided by it (Granite's ``logits_scaling``). ``attn_sinks``: a learned
      logit per head that joins every softmax and takes its share of the probability (gpt-oss).
    - ``ropes``: (key, :class:`RopeConfig`) per rope a layer may use (``BlockSpec.rope``); ``rope`` is the main one.
    - ``mla``: the attention part is multi-head latent attention (:class:`MLAConfig`, DeepSeek); ``head_dim`` is then
      its rope key's width (``qk_rope_head_dim``), what the rope tables need.
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
    mla: MLAConfig | None = None
    compressed: CompressedAttentionConfig | None = None
    hyper: HyperConfig | None = None
    layer_specs: tuple[BlockSpec, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    hidden_act: str = "silu"
    norm_placement: str = "pre"
    norm_offset: float = 0.0
    norm_fp32_scale: bool = False
    qk_norm_scope: str = "head"
    fused_qkv: bool = False
    fused_gate_up: bool = False
    embed_scale: float | None = None
    embed_scale_in_dtype: bool = False
    residual_multiplier: float | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    logits_divisor: float | None = None
    attn_sinks: bool = False
    ropes: tuple[tuple[str, RopeConfig], ...] = ()
    # where the text model sits in a HF checkpoint: its module path in memory (PEFT's names) and its key prefixes
    # on disk ("model." and "" for a *ForCausalLM; a multimodal wrapper's language model elsewhere: TextWrapper)
    hf_module_prefix: str = "model."
    hf_weight_prefix: str = "model."
    hf_head_prefix: str = ""
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.layer_specs:  # every layer alike: dense MLP, the config's window
            object.__setattr__(self, "layer_specs", (BlockSpec(window=self.sliding_window),) * self.num_layers)
        if len(self.layer_specs) != self.num_layers:
            raise CheckpointError(f"{len(self.layer_specs)} layer specs for {self.num_layers} layers")
        if not self.ropes:
            object.__setattr__(self, "ropes", (("default", self.rope),))

    def rope_for(self, key: str) -> RopeConfig:
        return dict(self.ropes)[key]


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


ACTIVATIONS = {  # config value -> tx's gated activation
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


def parse_ropes(data: dict, family, head_dim: int, path: str) -> dict[str, RopeConfig]:
    """Rope parameters -> {key: RopeConfig}: one "default" entry, or one per layer type when the config keys
    ``rope_parameters`` by layer type (Gemma 3, OLMo 3: "full_attention", "sliding_attention")."""
    params = family.rope_parameters(data) if family.rope_parameters else data.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return {k: parse_rope(v, data, head_dim, f"{path}: rope_parameters[{k!r}]") for k, v in params.items()}
    if not isinstance(params, dict):
        params = dict(data.get("rope_scaling") or {})
        params.setdefault("rope_theta", data.get("rope_theta", 10000.0))
    return {"default": parse_rope(params, data, head_dim, path)}


def parse_config(data: dict[str, Any], path: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from a config.json dict; the family decides the switches. A multimodal
    checkpoint (:data:`tx.models.families.TEXT_WRAPPERS`) gives the config of its language model."""
    from tx.models.families import family_for, family_layer_types, text_wrapper

    wrapper = text_wrapper(data)
    if wrapper is not None:
        return _wrapped_text_config(data, wrapper, path)
    family = family_for(data, path)
    if data.get("use_bidirectional_attention"):
        raise CheckpointError(
            f"{path}: 'use_bidirectional_attention' is true (an embedding model, e.g. EmbeddingGemma); tx runs "
            "causal language models only"
        )
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
    act = data.get(family.act_key, "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"{path}: {family.act_key} {act!r} is not supported; supported: {', '.join(ACTIVATIONS)} "
            "(tx's MLP is gated: act(gate) * up)"
        )
    mla = family.mla(data, path) if family.mla else None
    if mla is not None:  # the rope tables are the rope key's: qk_rope_head_dim channels
        head_dim = mla.qk_rope_head_dim
    window = data.get("sliding_window") if family.sliding_window_key(data) else None
    num_layers = _get(data, "num_hidden_layers", int, path)
    moe = family.moe(data, path) if family.moe else None
    specs = family.layer_specs(data, num_layers, int(window) if window else None, path)
    ropes = parse_ropes(data, family, head_dim, path)
    if "default" not in ropes and any(s.rope is not None and s.rope not in ropes for s in specs):
        # per layer type: each layer's rope is its type's
        types = family_layer_types(family, data, num_layers, path)
        missing = sorted({t for t in types if t not in ropes})
        if missing:
            raise CheckpointError(f"{path}: rope_parameters has no entry for layer types {missing}")
        specs = tuple(
            dataclasses.replace(spec, rope=t) if spec.rope is not None else spec for spec, t in zip(specs, types)
        )
    main = ropes.get("default") or ropes.get("full_attention") or next(iter(ropes.values()))
    extra = family.options(data, path, hidden) if family.options else {}
    return ModelConfig(
        family=family.name,
        model_type=data.get("model_type", family.model_types[0]),
        architecture=(data.get("architectures") or [family.architectures[0]])[0],
        vocab_size=_get(data, "vocab_size", int, path),
        hidden_size=hidden,
        intermediate_size=_get(data, "intermediate_size", int, path, None)
        or _get(data, "moe_intermediate_size", int, path),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_get(data, "rms_norm_eps", (int, float), path, 1e-6)),
        max_positions=_get(data, "max_position_embeddings", int, path, 4096),
        rope=main,
        ropes=tuple(sorted(ropes.items())),
        hidden_act=ACTIVATIONS[act],
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias(data),
        o_bias=family.o_bias(data),
        mlp_bias=bool(data.get("mlp_bias", False)),
        qk_norm=family.qk_norm,
        norm_placement=family.norm_placement,
        norm_offset=family.norm_offset,
        norm_fp32_scale=family.norm_fp32_scale,
        qk_norm_scope=family.qk_norm_scope,
        fused_qkv=family.fused,
        fused_gate_up=family.fused,
        sliding_window=int(window) if window else None,
        moe=moe,
        mla=mla,
        layer_specs=specs,
        bos_token_id=data.get("bos_token_id"),
        eos_token_id=data.get("eos_token_id"),
        pad_token_id=data.get("pad_token_id"),
        torch_dtype=data.get("dtype", data.get("torch_dtype")),
        raw=data,
        **extra,
    )


def _wrapped_text_config(data: dict[str, Any], wrapper, path: str) -> ModelConfig:
    """The language model's config of a multimodal checkpoint: its text config over the class defaults; token ids
    and embedding tying from the top level where it sets them (the hub's Gemma 3 keeps eos_token_id there)."""
    text = _get(data, wrapper.text_key, dict, path)
    text = {**wrapper.defaults, **{k: v for k, v in text.items() if v is not None}}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if data.get(key) is not None:
            text[key] = data[key]
    text.pop("architectures", None)
    cfg = parse_config(text, f"{path}: {wrapper.text_key}")
    return dataclasses.replace(
        cfg,
        architecture=wrapper.architecture,
        model_type=data.get("model_type", cfg.model_type),
        hf_module_prefix=wrapper.module_prefix,
        hf_weight_prefix=wrapper.weight_layouts[0][0],
        hf_head_prefix=wrapper.weight_layouts[0][1],
        raw=data,
        torch_dtype=data.get("dtype", data.get("torch_dtype", cfg.torch_dtype)),
    )


def load_config(folder: Path) -> ModelConfig:
    return parse_config(read_config_json(folder), str(Path(folder) / "config.json"))
