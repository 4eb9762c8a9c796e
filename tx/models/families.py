"""Model families as data: which parts and switches each family uses and how HF weight names map to tx's modules.

A family is a row in :data:`FAMILIES`, not a copy of the model code. It says:

- which switches the attention part uses (q/k/v bias, q/k norm, sliding window);
- which MLP part each layer has (:func:`layer_specs`: dense, or a mixture of experts on the layers the config's
  pattern selects: Qwen-MoE's ``decoder_sparse_step`` / ``mlp_only_layers``, Mixtral's every layer);
- the weight map of each part: a table from an HF key below ``model.layers.{i}.`` (``{j}`` stands for the expert
  index) to the path of the tx parameter inside a block, and to which slice of it the tensor fills (fused
  tensors such as the experts' ``gate_up_proj`` are filled from two on-disk tensors).

Per-layer tensors are stacked on the leading layer axis of the block that holds the layer (see
:mod:`tx.models.segments`); per-expert tensors on the expert axis after it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from tx.errors import CheckpointError, ConfigError
from tx.models.config import BlockSpec, CompressedAttentionConfig, HyperConfig, MLAConfig, MoEConfig


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One on-disk tensor of a block: its tx parameter (relative to the block) and the rows of it it fills.

    ``rows``: ``(part, parts)`` when the tensor fills the ``part``-th of ``parts`` equal row blocks of the tx
    parameter's last-but-one axis (a fused projection); None when it fills the whole slice.
    """

    tx_path: str
    rows: tuple[int, int] | None = None
    transpose: bool = False  # stored with the last two axes swapped (gpt-oss's experts: [E, in, out])


def _experts_key(data: dict) -> str:
    """transformers 5 writes ``num_local_experts``; older Qwen-MoE configs (the hub's) ``num_experts``."""
    return "num_local_experts" if data.get("num_local_experts") is not None else "num_experts"


def _moe_qwen(data: dict, path: str) -> MoEConfig | None:
    if not data.get(_experts_key(data)):
        return None
    shared = int(data.get("shared_expert_intermediate_size") or 0)
    moe = MoEConfig(
        num_experts=_positive(data, _experts_key(data), path),
        top_k=_positive(data, "num_experts_per_tok", path),
        expert_size=_positive(data, "moe_intermediate_size", path),
        norm_topk_prob=bool(data.get("norm_topk_prob", False)),
        shared_expert_size=shared,
        shared_expert_gate=shared > 0,
        router_aux_loss_coef=float(data.get("router_aux_loss_coef") or 0.0),
    )
    return _checked(moe, data, path)


def _moe_mixtral(data: dict, path: str) -> MoEConfig:
    moe = MoEConfig(
        num_experts=_positive(data, "num_local_experts", path),
        top_k=_positive(data, "num_experts_per_tok", path),
        expert_size=_positive(data, "intermediate_size", path),
        norm_topk_prob=True,  # Mixtral always renormalises the chosen weights
        router_aux_loss_coef=float(data.get("router_aux_loss_coef") or 0.0),
    )
    return _checked(moe, data, path)


def _moe_gpt_oss(data: dict, path: str) -> MoEConfig:
    """gpt-oss: router and experts with biases, softmax over the top-k logits, clamped SwiGLU."""
    moe = MoEConfig(
        num_experts=_positive(data, "num_local_experts", path),
        top_k=_positive(data, "num_experts_per_tok", path),
        expert_size=_positive(data, "intermediate_size", path),
        router="topk_softmax",
        router_bias=True,
        expert_bias=True,
        activation="clamped_swiglu",
        swiglu_alpha=float(data.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(data.get("swiglu_limit", 7.0)),
        router_aux_loss_coef=float(data.get("router_aux_loss_coef") or 0.0),
    )
    return _checked(moe, data, path)


# DeepSeek routing methods tx runs, by family: config key -> the values it accepts (None: the key may be absent)
DEEPSEEK_ROUTING = {
    "deepseek_v3": {"scoring_func": ("sigmoid", None), "topk_method": ("noaux_tc", None)},
    "deepseek_v2": {"scoring_func": ("softmax", None), "topk_method": ("greedy", "group_limited_greedy", None)},
    "glm4_moe_lite": {"scoring_func": ("sigmoid", None), "topk_method": ("noaux_tc", None)},
}


def _moe_deepseek(version: str):
    """DeepSeek's MoE (V3: sigmoid scores, e_score_correction_bias for the choice, groups scored by their two best
    experts; V2: softmax scores, ``topk_method`` greedy or group_limited_greedy with groups scored by their best),
    ``n_shared_experts`` ungated shared experts of ``moe_intermediate_size`` each. V2's router never renormalises the
    chosen weights (transformers' DeepseekV2TopkRouter ignores ``norm_topk_prob``)."""

    def moe(data: dict, path: str) -> MoEConfig:
        for key, allowed in DEEPSEEK_ROUTING[version].items():
            if data.get(key) not in allowed:
                shown = ", ".join(repr(v) for v in allowed if v is not None)
                raise ConfigError(f"{path}: {key} {data.get(key)!r} is not supported for {version}; supported: {shown}")
        experts = _positive(data, "n_routed_experts", path)
        width = _positive(data, "moe_intermediate_size", path)
        shared = data.get("n_shared_experts") or 0
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise CheckpointError(f"{path}: 'n_shared_experts' must be an integer >= 0, found {shared!r}")
        v3 = version in ("deepseek_v3", "glm4_moe_lite")  # GLM-4.7-Flash routes as DeepSeek-V3
        grouped = v3 or data.get("topk_method") == "group_limited_greedy"
        n_group = _positive(data, "n_group", path) if grouped and data.get("n_group") is not None else 1
        topk_group = _positive(data, "topk_group", path) if n_group > 1 else 1
        if experts % n_group or topk_group > n_group:
            raise CheckpointError(
                f"{path}: 'n_group' ({n_group}) must divide 'n_routed_experts' ({experts}) and be at least "
                f"'topk_group' ({topk_group})"
            )
        cfg = MoEConfig(
            num_experts=experts,
            top_k=_positive(data, "num_experts_per_tok", path),
            expert_size=width,
            router="grouped",
            norm_topk_prob=bool(data.get("norm_topk_prob")) and v3,
            shared_expert_size=width * shared,
            scoring="sigmoid" if v3 else "softmax",
            correction_bias=v3,
            n_group=n_group,
            topk_group=topk_group,
            group_score="top2_sum" if v3 else "max",
            routed_scaling_factor=float(_number(data, "routed_scaling_factor", path, 1.0)),
        )
        if n_group > 1 and cfg.top_k > topk_group * (experts // n_group):
            raise CheckpointError(
                f"{path}: 'num_experts_per_tok' ({cfg.top_k}) exceeds the experts of the 'topk_group' ({topk_group}) "
                f"groups a token may use ({experts // n_group} each)"
            )
        if v3 and n_group > 1 and experts // n_group < 2:
            raise CheckpointError(
                f"{path}: DeepSeek-V3 scores a group by its two best experts; 'n_group' ({n_group}) "
                f"leaves {experts // n_group} per group"
            )
        return _checked(cfg, data, path)

    return moe


def _mla(data: dict, path: str) -> MLAConfig:
    q_rank = data.get("q_lora_rank")
    if q_rank is not None:
        q_rank = _positive(data, "q_lora_rank", path)
    return MLAConfig(
        q_lora_rank=q_rank,
        kv_lora_rank=_positive(data, "kv_lora_rank", path),
        qk_nope_head_dim=_positive(data, "qk_nope_head_dim", path),
        qk_rope_head_dim=_positive(data, "qk_rope_head_dim", path),
        v_head_dim=_positive(data, "v_head_dim", path),
        # DeepSeek-V2's rope always rotates interleaved pairs (complex numbers); V3 has the switch
        rope_interleave=bool(data.get("rope_interleave", True)),
        bias=bool(data.get("attention_bias", False)),
    )


def _mla_v2(data: dict, path: str) -> MLAConfig:
    return dataclasses.replace(_mla(data, path), rope_interleave=True)  # V2 has no switch: always interleaved


def _rope_dict(data: dict) -> dict:
    params = data.get("rope_parameters")
    if isinstance(params, dict) and params:
        return params
    return dict(data.get("rope_scaling") or {})


def _deepseek_options(data: dict, path: str, hidden: int) -> dict:
    """The softmax scale: (nope + rope) ** -0.5, times yarn's mscale(factor, mscale_all_dim) squared when the rope is
    scaled (transformers' yarn_apply_mscale: the scale covers the non-rotary channels too)."""
    mla = _mla(data, path)
    scale = mla.qk_head_dim**-0.5
    rope = _rope_dict(data)
    if rope.get("rope_type", rope.get("type", "default")) not in (None, "default") and rope.get("mscale_all_dim"):
        factor = _number(rope, "factor", path)
        mscale = _number(rope, "mscale_all_dim", path)
        m = 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
        scale = scale * m * m
    return {"attn_scale": scale}


def _deepseek_layers(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    """The first ``first_k_dense_replace`` layers dense, the rest MoE (a segment each)."""
    k = data.get("first_k_dense_replace") or 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise CheckpointError(f"{path}: 'first_k_dense_replace' must be an integer >= 0, found {k!r}")
    freq = data.get("moe_layer_freq", 1)
    if freq not in (None, 1):
        raise ConfigError(
            f"{path}: moe_layer_freq {freq!r} is not supported; supported: 1 (every layer after the "
            "first_k_dense_replace dense ones is MoE)"
        )
    return tuple(BlockSpec(mlp="moe" if i >= k else "dense") for i in range(num_layers))


def _mlp_layer_types(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    """Glm4MoeLite's ``mlp_layer_types`` ("dense" / "sparse" per layer); without it, DeepSeek's
    ``first_k_dense_replace``."""
    types = data.get("mlp_layer_types")
    if types is None:
        return _deepseek_layers(data, num_layers, window, path)
    if not isinstance(types, list) or len(types) != num_layers or set(types) - {"dense", "sparse"}:
        raise CheckpointError(
            f"{path}: 'mlp_layer_types' must list 'dense' or 'sparse' for each of the {num_layers} layers, "
            f"found {types!r}"
        )
    return tuple(BlockSpec(mlp="moe" if t == "sparse" else "dense") for t in types)


V4_ATTENTION = {  # DeepSeek-V4's layer_types -> tx's attention kind (BlockSpec.attn)
    "sliding_attention": "sliding",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}
V4_COMPRESS_RATIOS = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
V4_ROUTERS = ("hash_moe", "moe")


def _v4_types(data: dict, num_layers: int, path: str) -> tuple[list, list]:
    """``layer_types`` and ``mlp_layer_types`` with transformers' defaults and legacy keys (``compress_ratios``,
    ``num_hash_layers``)."""
    types = data.get("layer_types")
    if types is None and isinstance(data.get("compress_ratios"), list):
        types = [V4_COMPRESS_RATIOS.get(r, r) for r in data["compress_ratios"]]
    if types is None:
        rest = ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(num_layers)]
        types = (["heavily_compressed_attention"] * 2 + rest)[:num_layers]
    mlp = data.get("mlp_layer_types")
    if mlp is None:
        n_hash = data.get("num_hash_layers", 3)
        mlp = ["hash_moe" if i < n_hash else "moe" for i in range(num_layers)]
    for key, value, allowed in (("layer_types", types, tuple(V4_ATTENTION)), ("mlp_layer_types", mlp, V4_ROUTERS)):
        if not isinstance(value, list) or len(value) != num_layers or any(t not in allowed for t in value):
            raise CheckpointError(
                f"{path}: {key!r} must list one of {allowed} for each of the {num_layers} layers, found {value!r}"
            )
    return types, mlp


def _v4_layers(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    """Every layer MoE with a sliding window; its attention kind and rope ("main" for sliding-only layers,
    "compress" for CSA / HCA) from ``layer_types``, hash or learned routing from ``mlp_layer_types``."""
    types, mlp = _v4_types(data, num_layers, path)
    size = _positive(data, "sliding_window", path)
    return tuple(
        BlockSpec(
            mlp="moe",
            window=size,
            rope="main" if t == "sliding_attention" else "compress",
            attn=V4_ATTENTION[t],
            router="hash" if m == "hash_moe" else None,
        )
        for t, m in zip(types, mlp)
    )


def _v4_ropes(data: dict) -> dict:
    """DeepSeek-V4's two ropes: "main" (``rope_theta``, no scaling: sliding-only layers) and "compress"
    (``compress_rope_theta`` with the config's scaling, yarn's attention factor 1); as transformers nests them."""
    params = data.get("rope_parameters") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        return {"main": params["main"], "compress": params["compress"]}
    scaling = {k: v for k, v in {**(data.get("rope_scaling") or {}), **params}.items() if k not in ("main", "compress")}
    partial = data.get("partial_rotary_factor")
    if partial is None and data.get("qk_rope_head_dim") and data.get("head_dim"):
        partial = data["qk_rope_head_dim"] / data["head_dim"]
    partial = 64 / 512 if partial is None else partial
    main = {"rope_type": "default", "rope_theta": data.get("rope_theta", 10000.0), "partial_rotary_factor": partial}
    compress = {**scaling, "rope_theta": data.get("compress_rope_theta", 160000.0), "partial_rotary_factor": partial}
    compress.setdefault("rope_type", compress.pop("type", "default"))
    if compress["rope_type"] == "yarn":
        compress.setdefault("attention_factor", 1.0)
    return {"main": main, "compress": compress}


# DeepSeek-V4 routing tx runs: scoring_func values
V4_SCORING = ("sqrtsoftplus", "sigmoid", "softmax")


def _moe_v4(data: dict, path: str) -> MoEConfig:
    """DeepSeek-V4's MoE: scores ``scoring_func`` of the fp32 logits (sqrt(softplus) on the hub), top-k of the
    scores plus ``e_score_correction_bias`` (or ``tid2eid[token]`` on hash layers), the chosen scores renormalised
    and times ``routed_scaling_factor``; clamped SiLU experts and one shared expert of the same width."""
    scoring = data.get("scoring_func", "sqrtsoftplus")
    if scoring not in V4_SCORING:
        raise ConfigError(
            f"{path}: scoring_func {scoring!r} is not supported for deepseek_v4; supported: "
            + ", ".join(map(repr, V4_SCORING))
        )
    width = _positive(data, "moe_intermediate_size", path)
    moe = MoEConfig(
        num_experts=_positive(data, "n_routed_experts", path),
        top_k=_positive(data, "num_experts_per_tok", path),
        expert_size=width,
        router="v4",
        norm_topk_prob=True,
        activation="clamped_silu",
        swiglu_limit=float(_number(data, "swiglu_limit", path, 10.0)),
        shared_expert_size=width,  # one shared expert whatever n_shared_experts says (transformers builds one)
        scoring=scoring,
        correction_bias=True,
        routed_scaling_factor=float(_number(data, "routed_scaling_factor", path, 1.5)),
        router_aux_loss_coef=float(data.get("router_aux_loss_coef") or 0.0),
    )
    return _checked(moe, data, path)


def _v4_options(data: dict, path: str, hidden: int) -> dict:
    head_dim = _positive(data, "head_dim", path)
    rope = _v4_ropes(data)["main"]
    rope_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    heads, groups = _positive(data, "num_attention_heads", path), _positive(data, "o_groups", path)
    if heads % groups:
        raise CheckpointError(f"{path}: 'o_groups' ({groups}) must divide 'num_attention_heads' ({heads})")
    if data.get("num_key_value_heads", 1) != 1:
        raise CheckpointError(
            f"{path}: DeepSeek-V4 has one key/value head, found 'num_key_value_heads' {data['num_key_value_heads']!r}"
        )
    rates = dict(data.get("compress_rates") or {})
    rates.setdefault("compressed_sparse_attention", data.get("compress_rate_csa", 4))
    rates.setdefault("heavily_compressed_attention", data.get("compress_rate_hca", 128))
    for key in ("compressed_sparse_attention", "heavily_compressed_attention"):
        if isinstance(rates[key], bool) or not isinstance(rates[key], int) or rates[key] < 1:
            raise CheckpointError(f"{path}: compress_rates[{key!r}] must be a positive integer, found {rates[key]!r}")
    index_dim = _positive(data, "index_head_dim", path)
    if index_dim < rope_dim:
        raise CheckpointError(
            f"{path}: 'index_head_dim' ({index_dim}) must be at least the rope width ({rope_dim}): the indexer's "
            "queries are rotated on their trailing rope channels"
        )
    compressed = CompressedAttentionConfig(
        head_dim=head_dim,
        rope_dim=rope_dim,
        q_lora_rank=_positive(data, "q_lora_rank", path),
        o_groups=groups,
        o_lora_rank=_positive(data, "o_lora_rank", path),
        csa_rate=rates["compressed_sparse_attention"],
        hca_rate=rates["heavily_compressed_attention"],
        index_heads=_positive(data, "index_n_heads", path),
        index_head_dim=index_dim,
        index_topk=_positive(data, "index_topk", path),
    )
    hyper = HyperConfig(
        n=_positive(data, "hc_mult", path),
        iters=_positive(data, "hc_sinkhorn_iters", path),
        eps=float(_number(data, "hc_eps", path, 1e-6)),
        norm_eps=float(_number(data, "rms_norm_eps", path, 1e-6)),
    )
    return {"compressed": compressed, "hyper": hyper, "attn_sinks": True}


def _checked(moe: MoEConfig, data: dict, path: str) -> MoEConfig:
    """Options tx cannot run name their key and value."""
    if moe.top_k > moe.num_experts:
        raise CheckpointError(
            f"{path}: 'num_experts_per_tok' ({moe.top_k}) exceeds the number of experts ({moe.num_experts}, "
            f"{_experts_key(data)!r}); a token cannot choose more experts than exist"
        )
    return moe


def _positive(data: dict, key: str, path: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: {key!r} must be a positive integer, found {value!r}")
    return value


def _all_dense(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    return (BlockSpec(window=window),) * num_layers


def _all_moe(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    return (BlockSpec(mlp="moe", window=window),) * num_layers


def _layer_types_moe(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    """Every layer MoE; ``layer_types`` picks sliding ("sliding_attention", the config's window) or full attention."""
    types = data.get("layer_types") or ["full_attention"] * num_layers
    known = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != num_layers or any(t not in known for t in types):
        raise CheckpointError(
            f"{path}: 'layer_types' must list one of {known} per layer ({num_layers}), found {types!r}"
        )
    size = data.get("sliding_window")
    if "sliding_attention" in types and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise CheckpointError(f"{path}: sliding layers need 'sliding_window' >= 1, found {size!r}")
    return tuple(BlockSpec(mlp="moe", window=size if t == "sliding_attention" else None) for t in types)


def _qwen_moe_layers(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    """transformers' rule: layer i is sparse when it is not in ``mlp_only_layers``, experts exist and
    ``(i + 1) % decoder_sparse_step == 0``."""
    step = data.get("decoder_sparse_step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise CheckpointError(f"{path}: 'decoder_sparse_step' must be an integer >= 1, found {step!r}")
    dense_only = data.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense_only):
        raise CheckpointError(f"{path}: 'mlp_only_layers' must be a list of layer indices, found {dense_only!r}")
    experts = data.get(_experts_key(data)) or 0
    return tuple(
        BlockSpec(mlp="moe" if experts and i not in dense_only and (i + 1) % step == 0 else "dense", window=window)
        for i in range(num_layers)
    )


def family_layer_types(family: Family, data: dict, num_layers: int, path: str) -> tuple[str, ...]:
    """``layer_types`` of the config ("full_attention" / "sliding_attention" per layer), or the family's default
    pattern when the config has none (older configs); all "full_attention" for a family without one."""
    types = data.get("layer_types")
    if types is None:
        if family.default_layer_types is None:
            return ("full_attention",) * num_layers
        return tuple(family.default_layer_types(data, num_layers))
    if not isinstance(types, list) or len(types) != num_layers or not all(isinstance(t, str) for t in types):
        raise CheckpointError(f"{path}: 'layer_types' must be a list of {num_layers} strings, found {types!r}")
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise CheckpointError(
            f"{path}: layer_types {unknown} are not supported; supported: 'full_attention', 'sliding_attention'"
        )
    return tuple(types)


def _every(n_key: str, default: int):
    """Default pattern: every ``n``-th layer full attention, the others sliding (Gemma 2 / 3, OLMo 3)."""

    def pattern(data: dict, num_layers: int):
        n = data.get(n_key) or default
        return ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(num_layers)]

    return pattern


def _typed_layers(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    """Dense layers whose window follows ``layer_types``: the config's ``sliding_window`` on sliding layers."""
    family = family_for(data, path)
    types = family_layer_types(family, data, num_layers, path)
    if "sliding_attention" in types and family.sliding_window_key(data):
        size = _positive(data, "sliding_window", path)
    else:
        size = None
    return tuple(BlockSpec(window=size if t == "sliding_attention" else None) for t in types)


def _smollm3_layers(data: dict, num_layers: int, window: int | None, path: str) -> tuple[BlockSpec, ...]:
    """SmolLM3: ``no_rope_layers[i]`` 0 marks a layer without rope (NoPE); windows as ``layer_types``."""
    flags = data.get("no_rope_layers")
    if flags is None:
        interval = data.get("no_rope_layer_interval") or 4
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if not isinstance(flags, list) or len(flags) != num_layers or not all(f in (0, 1) for f in flags):
        raise CheckpointError(f"{path}: 'no_rope_layers' must be a list of {num_layers} 0 / 1 flags, found {flags!r}")
    specs = _typed_layers(data, num_layers, window, path)
    return tuple(dataclasses.replace(s, rope=None) if not f else s for s, f in zip(specs, flags))


def _gemma_ropes(data: dict) -> dict | None:
    """Gemma 3's ropes per layer type; older configs: ``rope_theta`` (+ ``rope_scaling``) for full attention and
    ``rope_local_base_freq`` for sliding layers."""
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        return params
    full = dict(data.get("rope_scaling") or {})
    full.setdefault("rope_theta", data.get("rope_theta", 1_000_000.0))
    local = {"rope_type": "default", "rope_theta": data.get("rope_local_base_freq", 10_000.0)}
    return {"full_attention": full, "sliding_attention": local}


def _number(data: dict, key: str, path: str, default=None):
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise CheckpointError(f"{path}: {key!r} must be a positive number, found {value!r}")
    return float(value)


def _gemma_options(attn_softcap: float | None, final_softcap: float | None):
    """Gemma's scalars; a key config.json lacks takes its transformers config class default (an explicit null:
    no soft-cap)."""

    def options(data: dict, path: str, hidden: int) -> dict:
        scalar = _number(data, "query_pre_attn_scalar", path, 256)
        return dict(
            embed_scale=float(hidden**0.5),
            embed_scale_in_dtype=True,
            attn_scale=scalar**-0.5,
            attn_softcap=_number(data, "attn_logit_softcapping", path, attn_softcap),
            final_softcap=_number(data, "final_logit_softcapping", path, final_softcap),
        )

    return options


def _granite_options(data: dict, path: str, hidden: int) -> dict:
    return dict(
        embed_scale=_number(data, "embedding_multiplier", path, 1.0),
        residual_multiplier=_number(data, "residual_multiplier", path, 1.0),
        attn_scale=_number(data, "attention_multiplier", path, 1.0),
        logits_divisor=_number(data, "logits_scaling", path, 1.0),
    )


@dataclasses.dataclass(frozen=True)
class Family:
    """A family row. Block options (see :class:`~tx.models.config.ModelConfig`): ``norm_placement``,
    ``norm_offset``, ``norm_fp32_scale``, ``qk_norm`` / ``qk_norm_scope``, ``fused`` (fused qkv and gate_up
    projections); ``act_key``: the config key of the MLP activation; ``options(data, path, hidden)``: the family's
    scalar options (scales, soft-caps, multipliers); ``rope_parameters(data)``: its per-layer-type rope dict;
    ``default_layer_types``: its local / global pattern when config.json has no ``layer_types``."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    qk_norm: bool = False
    qkv_bias: Callable[[dict], bool] = lambda cfg: bool(cfg.get("attention_bias", False))
    o_bias: Callable[[dict], bool] = lambda cfg: bool(cfg.get("attention_bias", False))
    sliding_window_key: Callable[[dict], bool] = lambda cfg: False
    moe: Callable[[dict, str], MoEConfig | None] | None = None
    layer_specs: Callable[[dict, int, int | None, str], tuple[BlockSpec, ...]] = _all_dense
    moe_weights: str = "qwen"  # which on-disk layout the experts use: a key of MOE_WEIGHTS
    act_key: str = "hidden_act"
    norm_placement: str = "pre"
    norm_offset: float = 0.0
    norm_fp32_scale: bool = False
    qk_norm_scope: str = "head"
    fused: bool = False
    options: Callable[[dict, str, int], dict] | None = None
    rope_parameters: Callable[[dict], dict | None] | None = None
    default_layer_types: Callable[[dict, int], list[str]] | None = None
    # HF module paths that differ from LINEAR_MODULES' (site name -> path inside model.layers.{i})
    hf_modules: dict[str, str] = dataclasses.field(default_factory=dict)
    mla: Callable[[dict, str], MLAConfig] | None = None  # multi-head latent attention (ATTENTION_MAPS["mla"])
    # the family's own block weight map (BlockSpec -> {HF key below layers.{i}.: WeightSpec}); None: the shared maps
    block_weights: Callable[[BlockSpec], dict[str, WeightSpec]] | None = None
    # a key of GLOBAL_LAYOUTS: its global tensors per on-disk layout; None: GLOBAL_WEIGHTS under the config's prefixes
    global_weights: str | None = None
    # LINEAR_MODULES sites that transformers does not hold as nn.Linear (PEFT cannot adapt them): not LoRA targets
    not_linear: tuple[str, ...] = ()


DEEPSEEK_SHARED_EXPERTS = {  # DeepSeek names its (ungated) shared experts mlp.shared_experts
    f"shared_expert.{p}": f"mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")
}

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
    Family(
        "qwen3_moe",
        ("Qwen3MoeForCausalLM",),
        ("qwen3_moe",),
        qk_norm=True,
        sliding_window_key=lambda cfg: bool(cfg.get("use_sliding_window", False)),
        moe=_moe_qwen,
        layer_specs=_qwen_moe_layers,
    ),
    Family(
        "qwen2_moe",
        ("Qwen2MoeForCausalLM",),
        ("qwen2_moe",),
        qkv_bias=lambda cfg: bool(cfg.get("qkv_bias", True)),
        o_bias=lambda cfg: False,
        sliding_window_key=lambda cfg: bool(cfg.get("use_sliding_window", False)),
        moe=_moe_qwen,
        layer_specs=_qwen_moe_layers,
    ),
    Family(
        "mixtral",
        ("MixtralForCausalLM",),
        ("mixtral",),
        qkv_bias=lambda cfg: False,
        o_bias=lambda cfg: False,
        sliding_window_key=lambda cfg: bool(cfg.get("sliding_window")),
        moe=_moe_mixtral,
        layer_specs=_all_moe,
        moe_weights="mixtral",
    ),
    Family(
        "gpt_oss",
        ("GptOssForCausalLM",),
        ("gpt_oss",),
        moe=_moe_gpt_oss,
        layer_specs=_layer_types_moe,
        moe_weights="gpt_oss",
        hf_modules={"gate": "mlp.router"},
        options=lambda data, path, hidden: {"attn_sinks": True},
    ),
    *(
        Family(
            name,
            (arch,),
            (name,),
            moe=_moe_deepseek(name),
            layer_specs=_mlp_layer_types if name == "glm4_moe_lite" else _deepseek_layers,
            moe_weights="deepseek",
            options=_deepseek_options,
            mla=_mla_v2 if name == "deepseek_v2" else _mla,
            hf_modules=DEEPSEEK_SHARED_EXPERTS,
        )
        for name, arch in (
            ("deepseek_v3", "DeepseekV3ForCausalLM"),
            ("deepseek_v2", "DeepseekV2ForCausalLM"),
            ("glm4_moe_lite", "Glm4MoeLiteForCausalLM"),
        )
    ),
    Family(
        "deepseek_v4",
        ("DeepseekV4ForCausalLM",),
        ("deepseek_v4",),
        sliding_window_key=lambda cfg: True,
        moe=_moe_v4,
        layer_specs=_v4_layers,
        options=_v4_options,
        rope_parameters=_v4_ropes,
        hf_modules=DEEPSEEK_SHARED_EXPERTS,
        block_weights=lambda spec: v4_block_weights(spec),
        global_weights="deepseek_v4",
        not_linear=("gate",),  # DeepseekV4TopKRouter / HashRouter hold a weight but are not nn.Linear
    ),
    Family(
        "gemma2",
        ("Gemma2ForCausalLM",),
        ("gemma2",),
        sliding_window_key=lambda cfg: True,
        layer_specs=_typed_layers,
        act_key="hidden_activation",
        norm_placement="sandwich",
        norm_offset=1.0,
        norm_fp32_scale=True,
        options=_gemma_options(50.0, 30.0),
        default_layer_types=_every("sliding_window_pattern", 2),
    ),
    Family(
        "gemma3",
        ("Gemma3ForCausalLM",),
        ("gemma3_text",),
        qk_norm=True,
        sliding_window_key=lambda cfg: True,
        layer_specs=_typed_layers,
        act_key="hidden_activation",
        norm_placement="sandwich",
        norm_offset=1.0,
        norm_fp32_scale=True,
        options=_gemma_options(None, None),
        rope_parameters=_gemma_ropes,
        default_layer_types=_every("sliding_window_pattern", 6),
    ),
    Family("phi3", ("Phi3ForCausalLM",), ("phi3",), qkv_bias=lambda cfg: False, o_bias=lambda cfg: False, fused=True),
    Family(
        "olmo2",
        ("Olmo2ForCausalLM",),
        ("olmo2",),
        qk_norm=True,
        norm_placement="post",
        norm_fp32_scale=True,
        qk_norm_scope="proj",
    ),
    Family(
        "olmo3",
        ("Olmo3ForCausalLM",),
        ("olmo3",),
        qk_norm=True,
        sliding_window_key=lambda cfg: True,
        layer_specs=_typed_layers,
        norm_placement="post",
        norm_fp32_scale=True,
        qk_norm_scope="proj",
        default_layer_types=_every("sliding_window_pattern", 4),
    ),
    Family("granite", ("GraniteForCausalLM",), ("granite",), options=_granite_options),
    Family(
        "smollm3",
        ("SmolLM3ForCausalLM",),
        ("smollm3",),
        sliding_window_key=lambda cfg: bool(cfg.get("use_sliding_window", False)),
        layer_specs=_smollm3_layers,
    ),
)


@dataclasses.dataclass(frozen=True)
class TextWrapper:
    """A multimodal checkpoint whose language model is a family's text model; tx loads, adapts and exports that
    text model and leaves the rest (vision tower, projector) as it is.

    ``text_key``: the config.json key of the text model's config; ``module_prefix``: the text model's HF module
    path in memory (what PEFT's adapter keys and ``target_modules`` name); ``weight_layouts``: the (text model,
    ``lm_head``) key prefixes on disk, as writers have saved them; ``defaults``: the text config class's
    defaults, for the keys a hub config leaves out.
    """

    architecture: str
    text_key: str
    module_prefix: str
    weight_layouts: tuple[tuple[str, str], ...]
    defaults: dict


# transformers' Gemma3TextConfig defaults (tests/test_gemma3_multimodal.py checks them against the class): the
# hub's Gemma 3 configs (google/gemma-3-4b-it, ...) give only the sizes that differ from them.
GEMMA3_TEXT_DEFAULTS = {
    "model_type": "gemma3_text",
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
TEXT_WRAPPERS: dict[str, TextWrapper] = {
    "Gemma3ForConditionalGeneration": TextWrapper(
        "Gemma3ForConditionalGeneration",
        "text_config",
        "model.language_model.",
        # transformers 5 (and the original hub release) write language_model.model.*; 4.50-4.57 model.language_model.*
        (("language_model.model.", "language_model."), ("model.language_model.", "")),
        GEMMA3_TEXT_DEFAULTS,
    ),
}


def text_wrapper(config: dict) -> TextWrapper | None:
    """The :class:`TextWrapper` of a multimodal config.json, None for a text model's."""
    for arch in config.get("architectures") or ():
        if arch in TEXT_WRAPPERS:
            return TEXT_WRAPPERS[arch]
    return None


def supported() -> str:
    names = [f"{f.architectures[0]} (model_type {f.model_types[0]!r})" for f in FAMILIES]
    return ", ".join(names + [f"{w} (its language model)" for w in TEXT_WRAPPERS])


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


def family_named(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


# HF key below "model.layers.{i}." -> where it goes in a tx block. Weights keep HF's [out, in] layout (no
# transpose on load, PEFT's layout for LoRA).
NORM_WEIGHTS: dict[str, dict[str, WeightSpec]] = {
    "pre": {
        "input_layernorm.weight": WeightSpec("attn_norm.scale"),
        "post_attention_layernorm.weight": WeightSpec("mlp_norm.scale"),
    },
    "sandwich": {
        "input_layernorm.weight": WeightSpec("attn_norm.scale"),
        "post_attention_layernorm.weight": WeightSpec("attn_post_norm.scale"),
        "pre_feedforward_layernorm.weight": WeightSpec("mlp_norm.scale"),
        "post_feedforward_layernorm.weight": WeightSpec("mlp_post_norm.scale"),
    },
    "post": {
        "post_attention_layernorm.weight": WeightSpec("attn_post_norm.scale"),
        "post_feedforward_layernorm.weight": WeightSpec("mlp_post_norm.scale"),
    },
}
ATTENTION_WEIGHTS: dict[str, WeightSpec] = {
    **NORM_WEIGHTS["pre"],
    "self_attn.qkv_proj.weight": WeightSpec("attn.qkv_proj.weight"),
    "self_attn.q_proj.weight": WeightSpec("attn.q_proj.weight"),
    "self_attn.k_proj.weight": WeightSpec("attn.k_proj.weight"),
    "self_attn.v_proj.weight": WeightSpec("attn.v_proj.weight"),
    "self_attn.o_proj.weight": WeightSpec("attn.o_proj.weight"),
    "self_attn.q_proj.bias": WeightSpec("attn.q_proj.bias"),
    "self_attn.k_proj.bias": WeightSpec("attn.k_proj.bias"),
    "self_attn.v_proj.bias": WeightSpec("attn.v_proj.bias"),
    "self_attn.o_proj.bias": WeightSpec("attn.o_proj.bias"),
    "self_attn.q_norm.weight": WeightSpec("attn.q_norm.scale"),
    "self_attn.k_norm.weight": WeightSpec("attn.k_norm.scale"),
    "self_attn.sinks": WeightSpec("attn.sinks"),
}
MLA_WEIGHTS: dict[str, WeightSpec] = {
    **{
        f"self_attn.{name}.{p}": WeightSpec(f"attn.{name}.{p}")
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
        for p in ("weight", "bias")
    },
    "self_attn.q_a_layernorm.weight": WeightSpec("attn.q_a_layernorm.scale"),
    "self_attn.kv_a_layernorm.weight": WeightSpec("attn.kv_a_layernorm.scale"),
}
DENSE_MLP_WEIGHTS: dict[str, WeightSpec] = {
    "mlp.gate_up_proj.weight": WeightSpec("mlp.gate_up_proj.weight"),
    "mlp.gate_proj.weight": WeightSpec("mlp.gate_proj.weight"),
    "mlp.up_proj.weight": WeightSpec("mlp.up_proj.weight"),
    "mlp.down_proj.weight": WeightSpec("mlp.down_proj.weight"),
    "mlp.gate_proj.bias": WeightSpec("mlp.gate_proj.bias"),
    "mlp.up_proj.bias": WeightSpec("mlp.up_proj.bias"),
    "mlp.down_proj.bias": WeightSpec("mlp.down_proj.bias"),
}
# On-disk expert layouts ({j}: expert index). tx holds the experts fused as transformers 5 does in memory:
# gate_up_proj [E, 2I, C] (gate rows first) and down_proj [E, C, I].
MOE_WEIGHTS: dict[str, dict[str, WeightSpec]] = {
    "qwen": {
        "mlp.gate.weight": WeightSpec("mlp.router.weight"),
        "mlp.experts.{j}.gate_proj.weight": WeightSpec("mlp.experts.gate_up_proj.weight", (0, 2)),
        "mlp.experts.{j}.up_proj.weight": WeightSpec("mlp.experts.gate_up_proj.weight", (1, 2)),
        "mlp.experts.{j}.down_proj.weight": WeightSpec("mlp.experts.down_proj.weight"),
        "mlp.shared_expert.gate_proj.weight": WeightSpec("mlp.shared_expert.gate_proj.weight"),
        "mlp.shared_expert.up_proj.weight": WeightSpec("mlp.shared_expert.up_proj.weight"),
        "mlp.shared_expert.down_proj.weight": WeightSpec("mlp.shared_expert.down_proj.weight"),
        "mlp.shared_expert_gate.weight": WeightSpec("mlp.shared_expert_gate.weight"),
    },
    "gpt_oss": {  # fused on disk, [E, in, out] (or MXFP4 blocks of the transposed weight: see tx.models.mxfp4)
        "mlp.router.weight": WeightSpec("mlp.router.weight"),
        "mlp.router.bias": WeightSpec("mlp.router.bias"),
        "mlp.experts.gate_up_proj": WeightSpec("mlp.experts.gate_up_proj.weight", transpose=True),
        "mlp.experts.gate_up_proj_bias": WeightSpec("mlp.experts.gate_up_proj.bias"),
        "mlp.experts.down_proj": WeightSpec("mlp.experts.down_proj.weight", transpose=True),
        "mlp.experts.down_proj_bias": WeightSpec("mlp.experts.down_proj.bias"),
    },
    "mixtral": {
        "block_sparse_moe.gate.weight": WeightSpec("mlp.router.weight"),
        "block_sparse_moe.experts.{j}.w1.weight": WeightSpec("mlp.experts.gate_up_proj.weight", (0, 2)),
        "block_sparse_moe.experts.{j}.w3.weight": WeightSpec("mlp.experts.gate_up_proj.weight", (1, 2)),
        "block_sparse_moe.experts.{j}.w2.weight": WeightSpec("mlp.experts.down_proj.weight"),
    },
}
MOE_WEIGHTS["deepseek"] = {
    "mlp.gate.weight": WeightSpec("mlp.router.weight"),
    "mlp.gate.e_score_correction_bias": WeightSpec("mlp.score_correction_bias"),
    **{k: v for k, v in MOE_WEIGHTS["qwen"].items() if ".experts." in k},
    **{
        f"mlp.shared_experts.{name}.{p}": WeightSpec(f"mlp.shared_expert.{name}.{p}")
        for name in ("gate_proj", "up_proj", "down_proj")
        for p in ("weight", "bias")
    },
}
GLOBAL_WEIGHTS: dict[str, str] = {
    "model.embed_tokens.weight": "embed.embedding",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "lm_head.weight",
}


# DeepSeek-V4 as transformers' save_pretrained writes it (the upstream names; keys below layers.{i}.)
V4_ATTENTION_WEIGHTS: dict[str, WeightSpec] = {
    "attn_norm.weight": WeightSpec("attn_norm.scale"),
    "ffn_norm.weight": WeightSpec("mlp_norm.scale"),
    "attn.attn_sink": WeightSpec("attn.sinks"),
    "attn.wq_a.weight": WeightSpec("attn.q_a_proj.weight"),
    "attn.q_norm.weight": WeightSpec("attn.q_a_norm.scale"),
    "attn.wq_b.weight": WeightSpec("attn.q_b_proj.weight"),
    "attn.wkv.weight": WeightSpec("attn.kv_proj.weight"),
    "attn.norm.weight": WeightSpec("attn.kv_norm.scale"),
    "attn.wo_a.weight": WeightSpec("attn.o_a_proj.weight"),
    "attn.wo_b.weight": WeightSpec("attn.o_b_proj.weight"),
    **{
        f"hc_{site}_{name}": WeightSpec(f"{res}_residual.{tx}", transpose=name == "fn")
        for site, res in (("attn", "attn"), ("ffn", "mlp"))
        for name, tx in (("fn", "proj"), ("base", "base"), ("scale", "scale"))
    },
}


def _v4_compressor_weights(disk: str, tx: str) -> dict[str, WeightSpec]:
    return {
        f"{disk}.wkv.weight": WeightSpec(f"{tx}.kv_proj.weight"),
        f"{disk}.wgate.weight": WeightSpec(f"{tx}.gate_proj.weight"),
        f"{disk}.ape": WeightSpec(f"{tx}.position_bias"),
        f"{disk}.norm.weight": WeightSpec(f"{tx}.kv_norm.scale"),
    }


V4_MOE_WEIGHTS: dict[str, WeightSpec] = {
    "ffn.gate.weight": WeightSpec("mlp.router.weight"),
    "ffn.experts.{j}.w1.weight": WeightSpec("mlp.experts.gate_up_proj.weight", (0, 2)),
    "ffn.experts.{j}.w3.weight": WeightSpec("mlp.experts.gate_up_proj.weight", (1, 2)),
    "ffn.experts.{j}.w2.weight": WeightSpec("mlp.experts.down_proj.weight"),
    "ffn.shared_experts.w1.weight": WeightSpec("mlp.shared_expert.gate_proj.weight"),
    "ffn.shared_experts.w3.weight": WeightSpec("mlp.shared_expert.up_proj.weight"),
    "ffn.shared_experts.w2.weight": WeightSpec("mlp.shared_expert.down_proj.weight"),
}


def v4_block_weights(spec: BlockSpec) -> dict[str, WeightSpec]:
    """One DeepSeek-V4 block's weights: its attention kind's compressor and indexer, its router's table or bias."""
    out = {**V4_ATTENTION_WEIGHTS, **V4_MOE_WEIGHTS}
    if spec.attn in ("csa", "hca"):
        out.update(_v4_compressor_weights("attn.compressor", "attn.compressor"))
    if spec.attn == "csa":
        out.update(_v4_compressor_weights("attn.indexer.compressor", "attn.compressor.indexer"))
        out["attn.indexer.wq_b.weight"] = WeightSpec("attn.compressor.indexer.q_b_proj.weight")
        out["attn.indexer.weights_proj.weight"] = WeightSpec("attn.compressor.indexer.scorer.weights_proj.weight")
    if spec.router == "hash":
        out["ffn.gate.tid2eid"] = WeightSpec("mlp.tid2eid")
    else:
        out["ffn.gate.bias"] = WeightSpec("mlp.score_correction_bias")
    return out


# its global tensors: transformers' save_pretrained keeps "model." on the decoder's keys; the hub's upstream files
# have none and name the embeddings, the head's hyper-connection and the LM head the upstream way
# ((layer key prefix, {HF key: tx path}), ...): the first layout whose first key is in the files is used
GLOBAL_LAYOUTS: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {}
GLOBAL_LAYOUTS["deepseek_v4"] = (
    (
        "model.",
        {
            "model.embed_tokens.weight": "embed.embedding",
            "model.norm.weight": "norm.scale",
            "head.weight": "lm_head.weight",
            "model.hc_head.hc_fn": "streams.proj",
            "model.hc_head.hc_base": "streams.base",
            "model.hc_head.hc_scale": "streams.scale",
        },
    ),
    (
        "",
        {
            "embed.weight": "embed.embedding",
            "norm.weight": "norm.scale",
            "head.weight": "lm_head.weight",
            "hc_head_fn": "streams.proj",
            "hc_head_base": "streams.base",
            "hc_head_scale": "streams.scale",
        },
    ),
)
TRANSPOSED_GLOBALS = ("streams.proj",)  # stored [n, n * C] (hc_fn), held [n * C, n]


def block_weights(family: Family, spec: BlockSpec) -> dict[str, WeightSpec]:
    """The weight map of one block: attention part + its MLP part."""
    if family.block_weights is not None:
        return family.block_weights(spec)
    mlp = MOE_WEIGHTS[family.moe_weights] if spec.mlp == "moe" else DENSE_MLP_WEIGHTS
    attention = MLA_WEIGHTS if family.mla else ATTENTION_WEIGHTS
    attention = {k: v for k, v in attention.items() if "input_layernorm" not in k and "post_attention" not in k}
    return {**NORM_WEIGHTS[family.norm_placement], **attention, **mlp}


# The linear projections of a block, in HF module naming (as transformers names the modules in memory, which is
# what PEFT targets): LoRA targets and the PEFT key layout use these. tx path relative to the block.
LINEAR_MODULES: dict[str, tuple[str, str]] = {
    "qkv_proj": ("self_attn.qkv_proj", "attn.qkv_proj"),  # fused (Phi-3): PEFT targets the fused module
    "q_proj": ("self_attn.q_proj", "attn.q_proj"),
    "k_proj": ("self_attn.k_proj", "attn.k_proj"),
    "v_proj": ("self_attn.v_proj", "attn.v_proj"),
    "q_a_proj": ("self_attn.q_a_proj", "attn.q_a_proj"),  # multi-head latent attention (DeepSeek)
    "q_b_proj": ("self_attn.q_b_proj", "attn.q_b_proj"),
    "kv_a_proj_with_mqa": ("self_attn.kv_a_proj_with_mqa", "attn.kv_a_proj_with_mqa"),
    "kv_b_proj": ("self_attn.kv_b_proj", "attn.kv_b_proj"),
    "o_proj": ("self_attn.o_proj", "attn.o_proj"),
    "kv_proj": ("self_attn.kv_proj", "attn.kv_proj"),  # DeepSeek-V4: its one key/value head
    "o_b_proj": ("self_attn.o_b_proj", "attn.o_b_proj"),
    **{
        f"{owner}.{name}": (f"self_attn.{path}.{name}", f"attn.{path}.{name}")
        for owner, path, names in (
            ("compressor", "compressor", ("kv_proj", "gate_proj")),
            ("indexer", "compressor.indexer", ("kv_proj", "gate_proj", "q_b_proj")),
        )
        for name in names
    },
    "indexer.weights_proj": (
        "self_attn.compressor.indexer.scorer.weights_proj",
        "attn.compressor.indexer.scorer.weights_proj",
    ),
    "gate_proj": ("mlp.gate_proj", "mlp.gate_proj"),
    "up_proj": ("mlp.up_proj", "mlp.up_proj"),
    "gate_up_proj": ("mlp.gate_up_proj", "mlp.gate_up_proj"),
    "down_proj": ("mlp.down_proj", "mlp.down_proj"),
    "gate": ("mlp.gate", "mlp.router"),
    "shared_expert.gate_proj": ("mlp.shared_expert.gate_proj", "mlp.shared_expert.gate_proj"),
    "shared_expert.up_proj": ("mlp.shared_expert.up_proj", "mlp.shared_expert.up_proj"),
    "shared_expert.down_proj": ("mlp.shared_expert.down_proj", "mlp.shared_expert.down_proj"),
    "shared_expert_gate": ("mlp.shared_expert_gate", "mlp.shared_expert_gate"),
}
# Expert tensors PEFT adapts through ``target_parameters`` (HF module path of the experts module, its parameter).
EXPERT_PARAMETERS: dict[str, tuple[str, str]] = {
    "experts.gate_up_proj": ("mlp.experts", "mlp.experts.gate_up_proj"),
    "experts.down_proj": ("mlp.experts", "mlp.experts.down_proj"),
}
