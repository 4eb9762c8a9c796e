"""Attach adapters to a loaded model, switch them off, count what trains; target matching lives here.

``attach(model, lora=..., connector=...)`` changes the model in place:

- LoRA wraps each targeted :class:`~tx.models.layers.Linear` of the stacked block in a
  :class:`~tx.adapters.lora.LoRALinear` (the base Linear object is kept, never copied).
- A connector with ``expansion_rate > 1`` (or ``fracs > 1``) replaces every block's ``attn_residual`` /
  ``mlp_residual`` by :class:`~tx.adapters.connector.Connector` and ``model.streams`` by
  :class:`~tx.adapters.connector.StreamEdges`; ``expansion_rate == fracs == 1`` installs nothing (the plain residual
  path, same cost). With ``ConnectorConfig.layers`` each block's stacked connector gets a 0/1 layer mask
  (:class:`~tx.adapters.connector.ConnectorLayers`): the streams are widened once, at the embedding, and stay
  widened; a layer outside ``layers`` carries them through as ``x'[j] = x[j] + f(mean_i x[i])`` (the plain
  residual on every stream, no coefficients computed) instead of narrowing and widening again around it.

What trains is decided by type: :data:`TRAINABLE` selects :class:`~tx.adapters.lora.LoRAParam` and
:class:`~tx.adapters.connector.ConnectorParam`. Take gradients with ``nnx.DiffState(0, TRAINABLE)`` so no gradient
of a frozen base weight (``nnx.Param``) is ever built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from tx.adapters.connector import (
    Connector,
    ConnectorConfig,
    ConnectorParam,
    FrozenConnectorParam,
    HyperHead,
    StreamEdges,
    native_connector_config,
)
from tx.adapters.lora import ALL_LINEAR, LoRAConfig, LoRALinear, LoRAParam, merge
from tx.adapters.lora_experts import LoRAExperts, merge_experts
from tx.errors import AdapterError, ConfigError
from tx.models.block import Block
from tx.models.families import EXPERT_PARAMETERS, LINEAR_MODULES, family_named
from tx.models.layers import Linear
from tx.models.moe import ExpertLinear

TRAINABLE = nnx.Any(LoRAParam, ConnectorParam)
"""nnx filter of the adapter state the trainer updates: LoRA matrices and trainable connector variables."""
LORA_PARAM = LoRAParam
"""nnx filter of the LoRA matrices alone (e.g. for a learning rate of their own)."""

_COUNTED = (nnx.Param, LoRAParam, ConnectorParam, FrozenConnectorParam)


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """One linear projection of a stacked block: short name, HF sub-path, where it sits in the tx model and which
    global layers its stack holds (stack index ``k`` is layer ``layer_ids[k]``)."""

    name: str  # "q_proj"; "experts.gate_up_proj" for an expert tensor
    hf_module: str  # "self_attn.q_proj" (inside model.layers.{i}); "mlp.experts" for an expert tensor
    tx_path: tuple  # ("segments", 0, "blocks", 0, "attn", "q_proj")
    layer_ids: tuple[int, ...]
    param: str | None = None  # the expert tensor's parameter name in HF ("gate_up_proj"); None: a Linear module
    prefix: str = "model."  # the text model's HF module path ("model.language_model." in a multimodal wrapper)

    def hf_path(self, k: int) -> str:
        """HF module path of stack index ``k``."""
        return f"{self.prefix}layers.{self.layer_ids[k]}.{self.hf_module}"

    def param_path(self, k: int) -> str:
        """HF parameter path of stack index ``k`` (what PEFT's ``target_parameters`` match)."""
        return f"{self.hf_path(k)}.{self.param or 'weight'}"

    @property
    def is_experts(self) -> bool:
        return self.param is not None


def linear_sites(model) -> list[LinearSite]:
    """Every block's linear projections and expert tensors present in this model: blocks in model order, then
    :data:`LINEAR_MODULES` order, then the expert tensors."""
    from tx.models.decoder import blocks

    sites = []
    family = family_named(model.config.family)
    renamed = family.hf_modules
    hf_prefix = model.config.hf_module_prefix
    for prefix, _, layer_ids in blocks(model):
        for name, (hf_module, tx_rel) in LINEAR_MODULES.items():
            if name in family.not_linear:
                continue
            hf_module = renamed.get(name, hf_module)
            path = (*prefix, *tx_rel.split("."))
            if isinstance(module_at(model, path), Linear | LoRALinear):
                sites.append(LinearSite(name, hf_module, path, layer_ids, prefix=hf_prefix))
        for name, (hf_module, tx_rel) in EXPERT_PARAMETERS.items():
            path = (*prefix, *tx_rel.split("."))
            if isinstance(module_at(model, path), ExpertLinear | LoRAExperts):
                param = name.rpartition(".")[2]
                sites.append(LinearSite(name, hf_module, path, layer_ids, param=param, prefix=hf_prefix))
    return sites


def _paths(site: LinearSite, k: int) -> tuple[str, ...]:
    """The HF paths a ``targets`` entry may match: the module, and for an expert tensor the parameter too."""
    return (site.hf_path(k), site.param_path(k)) if site.is_experts else (site.hf_path(k),)


def module_at(model, path: tuple):
    node = model
    for part in path:
        if isinstance(part, int):
            node = node[part] if part < len(node) else None
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    return node


def set_module_at(model, path: tuple, value) -> None:
    setattr(module_at(model, path[:-1]), path[-1], value)


def _matcher(spec):
    """Callable (hf paths) -> bool for a list of names (exact or ``.name`` suffix, as PEFT) or a regex; true when
    any of the paths matches."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda paths: any(pattern.fullmatch(p) is not None for p in paths)
    return lambda paths: any(p == s or p.endswith("." + s) for s in spec for p in paths)


def _no_match_error(what: str, spec, missing, sites, num_layers: int) -> ConfigError:
    names = ", ".join(dict.fromkeys(s.name for s in sites))
    example = sites[0].hf_path(0) if sites else "model.layers.0.self_attn.q_proj"
    experts = [s for s in sites if s.is_experts]
    if experts:
        names += (
            f" (expert tensors: target 'experts' for both, or {experts[0].name!r}; as parameters "
            f"{experts[0].param_path(0)!r})"
        )
    if isinstance(spec, str):
        head = f"LoRA {what} regex {spec!r} matches no module"
    else:
        head = f"LoRA {what} {', '.join(map(repr, missing))} {'match' if len(missing) > 1 else 'matches'} no module"
    return ConfigError(
        f"{head}. The model's linear modules are: {names} (HF paths like {example!r}, layers 0..{num_layers - 1}); "
        "the LM head and the embeddings are not LoRA targets"
    )


def resolve_targets(config: LoRAConfig, sites: list[LinearSite], num_layers: int) -> dict[tuple, np.ndarray]:
    """Site tx path -> 0/1 mask [stack] of the stacked layers where it gets LoRA (only sites with some 1s)."""
    paths = [(s, k, _paths(s, k)) for s in sites for k in range(len(s.layer_ids))]
    if config.targets == ALL_LINEAR:
        chosen = {(s.tx_path, k) for s, k, _ in paths}
    elif not config.targets and config.target_parameters:
        chosen = set()
    else:
        match = _matcher(config.targets)
        chosen = {(s.tx_path, k) for s, k, p in paths if match(p)}
        if isinstance(config.targets, str):
            if not chosen:
                raise _no_match_error("targets", config.targets, (), sites, num_layers)
        else:
            missing = [t for t in config.targets if not any(_matcher((t,))(p) for _, _, p in paths)]
            if missing:
                raise _no_match_error("targets", config.targets, missing, sites, num_layers)
    if config.target_parameters:
        params = [(s, k, (s.param_path(k),)) for s in sites for k in range(len(s.layer_ids))]
        missing = [t for t in config.target_parameters if not any(_matcher((t,))(p) for _, _, p in params)]
        if missing:
            raise _no_match_error("target_parameters", config.target_parameters, missing, sites, num_layers)
        match = _matcher(config.target_parameters)
        chosen |= {(s.tx_path, k) for s, k, p in params if match(p)}
    if config.exclude:
        drop = _matcher(config.exclude)
        if isinstance(config.exclude, str):
            if not any(drop(p) for _, _, p in paths):
                raise _no_match_error("exclude", config.exclude, (), sites, num_layers)
        else:
            missing = [t for t in config.exclude if not any(_matcher((t,))(p) for _, _, p in paths)]
            if missing:
                raise _no_match_error("exclude", config.exclude, missing, sites, num_layers)
        chosen = {(s.tx_path, k) for s, k, p in paths if (s.tx_path, k) in chosen and not drop(p)}
    if config.layers is not None:
        bad = [i for i in config.layers if i >= num_layers]
        if bad:
            raise ConfigError(
                f"LoRA layers {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})"
            )
        layer_of = {(s.tx_path, k): s.layer_ids[k] for s, k, _ in paths}
        chosen = {key for key in chosen if layer_of[key] in config.layers}
    if not chosen:
        raise ConfigError(
            f"LoRA targets {config.targets!r} with exclude {config.exclude!r} and layers {config.layers!r} "
            "leave no module to adapt"
        )
    masks = {}
    for s in sites:
        mask = np.array([(s.tx_path, k) in chosen for k in range(len(s.layer_ids))], np.float32)
        if mask.any():
            masks[s.tx_path] = mask
    return masks


def has_lora(model) -> bool:
    return any(isinstance(m, LoRALinear | LoRAExperts) for _, m in nnx.iter_modules(model))


def lora_modules(model) -> list[tuple[LinearSite, LoRALinear | LoRAExperts]]:
    """(site, LoRALinear or LoRAExperts) for every adapted projection, in :func:`linear_sites` order."""
    out = []
    for site in linear_sites(model):
        module = module_at(model, site.tx_path)
        if isinstance(module, LoRALinear | LoRAExperts):
            out.append((site, module))
    return out


RESIDUALS = ("attn_residual", "mlp_residual")


def _is_adapter(model, module) -> bool:
    """An installed connector, or a checkpoint's native one (DeepSeek-V4) once attach has made it an adapter
    (``model.connector_config`` set); a native one left frozen is part of the base model."""
    if not isinstance(module, Connector):
        return False
    return not module.config.native or getattr(model, "connector_config", None) is not None


def connector_sites(model) -> list[tuple[str, Block, Connector, tuple[int, ...]]]:
    """(residual name, block, Connector, the block's layer ids) for every connector adapter (none when n = 1)."""
    from tx.models.decoder import blocks

    out = []
    for _, block, layer_ids in blocks(model):
        for name in RESIDUALS:
            if _is_adapter(model, module := getattr(block, name, None)):
                out.append((name, block, module, layer_ids))
    return out


def connector_modules(model) -> dict[str, Connector]:
    """Path of the residual module (``segments.0.blocks.0.attn_residual``) -> Connector adapter."""
    from tx.models.decoder import blocks

    return {
        ".".join(map(str, (*prefix, name))): module
        for prefix, block, _ in blocks(model)
        for name in RESIDUALS
        if _is_adapter(model, module := getattr(block, name, None))
    }


def native_modules(model) -> list:
    """A checkpoint's own hyper-connections (DeepSeek-V4): every native Connector and the HyperHead."""
    from tx.models.decoder import blocks

    out = [
        module
        for _, block, _ in blocks(model)
        for name in RESIDUALS
        if isinstance(module := getattr(block, name, None), Connector) and module.config.native
    ]
    if isinstance(getattr(model, "streams", None), HyperHead):
        out.append(model.streams)
    return out


def _retype_native(model, config: ConnectorConfig) -> None:
    """Give every native module ``config`` and its variables the type ``config.trainable`` asks for."""
    cls = ConnectorParam if config.trainable else FrozenConnectorParam
    for module in native_modules(model):
        module.config = config
        for name in ("proj", "base", "scale"):
            setattr(module, name, cls(getattr(module, name)[...]))


def _check_native(model, connector: ConnectorConfig) -> None:
    """``connector`` on a checkpoint with native hyper-connections: they become the adapter, trained or not as
    ``connector.trainable`` says; their shape is the checkpoint's."""
    h, arch = model.config.hyper, model.config.architecture
    fix = (
        f"use tx.ConnectorConfig(expansion_rate={h.n}, trainable=...) (on the command line: --expansion-rate "
        f"{h.n}, or leave it out), or no connector to keep them frozen (--expansion-rate 1)"
    )
    if connector.expansion_rate != h.n:
        raise ConfigError(
            f"this {arch} carries its own hyper-connections with hc_mult={h.n} streams; expansion_rate="
            f"{connector.expansion_rate} cannot change them: {fix}"
        )
    if connector.kind != "mhc" or connector.fracs != 1 or connector.layers is not None:
        raise ConfigError(
            f"this {arch} carries its own mhc hyper-connections on every layer; kind={connector.kind!r}, "
            f"fracs={connector.fracs}, layers={connector.layers} cannot replace them: {fix}"
        )


def _attach_native(model, connector: ConnectorConfig) -> ConnectorConfig:
    h = model.config.hyper
    native = native_connector_config(h.n, h.iters, h.eps, h.norm_eps, trainable=connector.trainable)
    _retype_native(model, native)
    return native


def has_connector(model) -> bool:
    """True when a connector that changes the architecture (n > 1) is installed."""
    return bool(connector_modules(model)) or isinstance(getattr(model, "streams", None), StreamEdges)


def attach(model, *, lora: LoRAConfig | None = None, connector: ConnectorConfig | None = None, seed: int = 0):
    """Adapt ``model`` in place and return it.

    lora: wrap the targeted linear projections (see :class:`~tx.adapters.lora.LoRAConfig`); A is seeded by
    ``lora.seed``, B is zero, so the model computes exactly what it did before.
    connector: replace both residual connections of every block and the stream edges (``expansion_rate > 1`` or
    ``fracs > 1``; ``layers`` picks the layers that compute it);
    its random projections are seeded by ``seed``. Connectors are exact at init as well (see
    :mod:`tx.adapters.connector`).
    The configs are kept as ``model.lora_config`` / ``model.connector_config``.
    """
    if lora is None and connector is None:
        raise ConfigError("attach() needs lora=LoRAConfig(...) and/or connector=ConnectorConfig(...)")
    if lora is not None and not isinstance(lora, LoRAConfig):
        raise ConfigError(f"lora must be a tx.LoRAConfig, got {type(lora).__name__}")
    if connector is not None and not isinstance(connector, ConnectorConfig):
        raise ConfigError(f"connector must be a tx.ConnectorConfig, got {type(connector).__name__}")
    if lora is not None and has_lora(model):
        raise AdapterError("the model already has LoRA attached; call tx.merge_lora(model) or tx.detach(model) first")
    if connector is not None and (has_connector(model) or getattr(model, "connector_config", None) is not None):
        raise AdapterError("the model already has a connector attached; call tx.detach(model) first")
    cfg = model.config
    if connector is not None and cfg.hyper is not None:  # before anything changes the model
        _check_native(model, connector)
    elif connector is not None and not connector.plain:  # before anything changes the model
        _connector_layers(connector, cfg.num_layers)
        if cfg.hidden_size % connector.fracs:
            divisors = [k for k in range(2, min(cfg.hidden_size, 16) + 1) if cfg.hidden_size % k == 0]
            raise ConfigError(
                f"connector fracs={connector.fracs} must divide the hidden size {cfg.hidden_size} (each stream is "
                f"split into equal fractions); fracs that fit: {divisors}"
            )
    if lora is not None:
        sites = linear_sites(model)
        masks = resolve_targets(lora, sites, cfg.num_layers)
        root = jax.random.key(lora.seed)
        for index, site in enumerate(sites):
            if site.tx_path not in masks:
                continue
            rank, scale = _rank_and_scale(lora, site, masks[site.tx_path])
            common = dict(name=site.name, rank=rank, scale=scale, key=jax.random.fold_in(root, index), init=lora.init)
            base = module_at(model, site.tx_path)
            if site.is_experts:
                wrapped = LoRAExperts(base, mask=masks[site.tx_path], **common)
            else:
                wrapped = LoRALinear(base, mask=masks[site.tx_path], dropout=lora.dropout, **common)
            set_module_at(model, site.tx_path, wrapped)
        model.lora_config = lora
    if connector is not None and cfg.hyper is not None:
        model.connector_config = _attach_native(model, connector)
    elif connector is not None:
        if not connector.plain:
            from tx.models.decoder import blocks

            chosen = _connector_layers(connector, cfg.num_layers)
            rngs = nnx.Rngs(seed)
            for _, block, layer_ids in blocks(model):
                mask = np.array([i in chosen for i in layer_ids], np.float32)
                for name in RESIDUALS:
                    conn = Connector(connector, cfg.hidden_size, len(layer_ids), rngs=rngs, layer_mask=mask)
                    setattr(block, name, conn)
            model.streams = StreamEdges(connector.expansion_rate)
        model.connector_config = connector
    return model


def _connector_layers(connector: ConnectorConfig, num_layers: int) -> set[int]:
    """The global layer ids that compute the connector (``ConnectorConfig.layers``; None = all)."""
    if connector.layers is None:
        return set(range(num_layers))
    bad = [i for i in connector.layers if i >= num_layers]
    if bad:
        raise ConfigError(
            f"connector layers {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})"
        )
    return set(connector.layers)


def _rank_and_scale(lora: LoRAConfig, site: LinearSite, mask) -> tuple[int, float]:
    """One (rank, scale) for a stacked site, from ``rank_pattern`` / ``alpha_pattern`` on its adapted layers."""
    path = site.param_path if site.is_experts else site.hf_path
    values = {lora.rank_and_scale(path(int(k))) for k in np.flatnonzero(mask)}
    if len(values) > 1:
        raise ConfigError(
            f"LoRA rank_pattern / alpha_pattern give {site.name} different ranks or alphas in different layers "
            f"({sorted(values)}); tx needs one rank and alpha per module across the layers it adapts"
        )
    return values.pop()


def detach(model):
    """Remove every adapter: LoRA modules give back their base Linear, residuals and stream edges become plain."""
    from tx.models.decoder import Residual, Streams

    for site, module in lora_modules(model):
        set_module_at(model, site.tx_path, module.base)
    for name, block, conn, _ in connector_sites(model):
        if not conn.config.native:
            setattr(block, name, Residual())
    if model.config.hyper is not None:  # native hyper-connections stay, frozen again
        h = model.config.hyper
        _retype_native(model, native_connector_config(h.n, h.iters, h.eps, h.norm_eps))
    if isinstance(getattr(model, "streams", None), StreamEdges):
        model.streams = Streams()
    model.lora_config = None
    model.connector_config = None
    return model


def merge_lora(model):
    """Fold every LoRA delta into its base weight (fp32, then the weight's dtype) and drop the LoRA modules.

    Like PEFT's ``merge_and_unload``: afterwards the model is a plain model (plus any connector) that computes
    the same function. Returns the model.
    """
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA to merge")
    for site, module in modules:
        set_module_at(model, site.tx_path, merge_experts(module) if site.is_experts else merge(module))
    model.lora_config = None
    return model


def _adapter_modules(model):
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Connector) and module.config.native:
            continue  # a checkpoint's own hyper-connections are part of the base model
        if isinstance(module, LoRALinear | LoRAExperts | Connector | StreamEdges):
            yield module


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator:
    """Run the base model inside the block: LoRA deltas, connectors and stream edges are switched off.

    Example::

        with tx.adapters_disabled(model):
            base_logits = model(ids)
    """
    saved = [(m, m.enabled) for m in _adapter_modules(model)]
    try:
        for m, _ in saved:
            m.enabled = False
        yield model
    finally:
        for m, enabled in saved:
            m.enabled = enabled


class ParameterCount(NamedTuple):
    """(trainable, total) parameter counts; ``str()`` reads like PEFT's ``print_trainable_parameters``."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_parameters(model) -> ParameterCount:
    """Count trainable adapter parameters and all parameters (base + adapters), as PEFT counts them.

    LoRA slots of layers that are switched off by ``LoRAConfig.layers`` are not counted (PEFT does not create them),
    nor connector slots of layers outside ``ConnectorConfig.layers``.
    """
    trainable = total = 0
    for _, module in lora_modules(model):
        per_layer = (module.lora_a.size + module.lora_b.size) / max(module.layer_mask.size, 1)
        n = int(round(per_layer * module.layer_mask.sum()))
        trainable += n
        total += n
    connector_vars = set()
    for _, _, conn, _ in connector_sites(model):
        mask = None if conn.mask is None else np.asarray(conn.mask[...])
        for _, var in nnx.to_flat_state(nnx.state(conn, nnx.Any(ConnectorParam, FrozenConnectorParam))):
            connector_vars.add(id(var))
            size = int(np.prod(var.shape))  # slots of layers outside ConnectorConfig.layers are not counted
            size = size if mask is None else int(round(size / mask.size * mask.sum()))
            total += size
            if isinstance(var, ConnectorParam):
                trainable += size
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Any(*_COUNTED))):
        if isinstance(var, LoRAParam) or id(var) in connector_vars:
            continue  # counted above, per adapted layer
        total += int(np.prod(var.shape))
        if isinstance(var, ConnectorParam):
            trainable += int(np.prod(var.shape))
    return ParameterCount(trainable, total)
