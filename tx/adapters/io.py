"""Save and load adapters: LoRA in PEFT's layout, connectors in a tx sidecar next to it.

An adapter folder holds

- ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA part, exactly as PEFT writes it (keys
  ``base_model.model.<HF module path>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``, one pair per
  adapted layer), so ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads it and tx loads PEFT's adapters;
- ``tx_connector_config.json`` + ``tx_connector.safetensors`` (only with a connector that installs, n or fracs > 1): the
  :class:`~tx.adapters.connector.ConnectorConfig` fields plus ``format_version`` and ``tx_version``, and the connector
  variables by their nnx path in the model (``layers.attn_residual.proj``, stacked on the layer axis). PEFT ignores
  these files.

The folder is written as one (:func:`tx.folder_io.write_folder`: a hidden sibling, then one swap), so a crash
leaves the old adapter or the new one, never new weights beside an old config. Only JSON and safetensors are
read, never pickles.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from tx.adapters.attach import (
    attach,
    connector_modules,
    connector_sites,
    detach,
    has_connector,
    has_lora,
    linear_sites,
    lora_modules,
)
from tx.adapters.connector import ConnectorConfig, ConnectorParam, FrozenConnectorParam, HyperHead
from tx.adapters.lora import ALL_LINEAR, LoRAConfig
from tx.adapters.lora_experts import a_from_peft, b_from_peft, to_peft
from tx.errors import AdapterError, ConfigError
from tx.folder_io import write_folder
from tx.jsonfile import read_json_object
from tx.models.families import LINEAR_MODULES
from tx.multihost import host_array, is_writer, sync
from tx.safetensors_io import SafetensorsFile, atomic_write_bytes, save_tensors
from tx.sharding import placed_like

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONNECTOR_CONFIG = "tx_connector_config.json"
CONNECTOR_WEIGHTS = "tx_connector.safetensors"
FORMAT_VERSION = 1  # of the tx sidecar; bump when its layout changes
# ConnectorConfig fields added after format 1: omitted at their defaults
_NEW_FIELDS = {"fracs": 1, "layers": None, "native": False}
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")
# PEFT options that change what the adapter computes and that tx does not implement: key -> "unset" test.
_UNSUPPORTED = {
    "use_dora": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "modules_to_save": lambda v: not v,
    "fan_in_fan_out": lambda v: not v,
    "layer_replication": lambda v: not v,
    "lora_bias": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "use_qalora": lambda v: not v,
}


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------------- saving


ROUTER = "gate"  # the MoE router's site name: PEFT adapts it as a parameter (transformers' router is no Linear)


def peft_target_spec(model) -> tuple[list[str] | str, list[int] | None, list[str]]:
    """(target_modules, layers_to_transform, target_parameters) that make PEFT adapt exactly what tx adapted.

    Linear modules: a list of names plus the layers (None = all) when PEFT's own matching of them gives exactly the
    adapted modules, otherwise a regex of the exact HF module paths. Expert tensors and the router (parameters to
    PEFT): short names (``experts.gate_up_proj``) when they cover every layer that has them, else full paths.
    """
    num_layers = model.config.num_layers
    adapted = lora_modules(model)
    _is_param_site = _param_site_rule(model)
    chosen = {
        site.hf_path(int(k)) for site, m in adapted if not _is_param_site(site) for k in np.flatnonzero(m.layer_mask)
    }
    sites = [s for s in linear_sites(model) if not _is_param_site(s)]
    every = [(site, k, site.hf_path(k)) for site in sites for k in range(len(site.layer_ids))]
    names = [n for n in LINEAR_MODULES if any(site.name == n and p in chosen for site, _, p in every)]
    layers = sorted({site.layer_ids[k] for site, k, p in every if p in chosen})
    # a list of names + layers when PEFT's own matching of them gives exactly the adapted modules
    picked = {
        p for site, k, p in every if site.layer_ids[k] in layers and any(p == n or p.endswith("." + n) for n in names)
    }
    # in a multimodal wrapper PEFT's name matching would also catch the vision tower's modules: exact paths
    wrapped = model.config.hf_module_prefix != "model."
    if not chosen:
        modules, layers_out = [], None
    elif picked == chosen and not wrapped:
        modules, layers_out = names, (None if len(layers) == num_layers else layers)
    else:
        by_module: dict[str, set[int]] = {}
        for site, k, p in every:
            if p in chosen:
                by_module.setdefault(site.hf_module, set()).add(site.layer_ids[k])
        parts = [
            rf"{re.escape(model.config.hf_module_prefix)}layers\.(?:{'|'.join(map(str, sorted(ids)))})\."
            + re.escape(module)
            for module, ids in by_module.items()
        ]
        modules, layers_out = "|".join(parts), None
    params_chosen = {
        site.param_path(int(k)) for site, m in adapted if _is_param_site(site) for k in np.flatnonzero(m.layer_mask)
    }
    all_params = {s.param_path(k) for s in linear_sites(model) for k in range(len(s.layer_ids))}
    short = sorted(
        {
            f"{s.hf_module}.{s.param or 'weight'}".split(".", 1)[1]
            if s.is_experts or s.name == ROUTER
            else f"{s.hf_module}.weight"
            for s, _ in adapted
            if _is_param_site(s)
        }
    )  # "experts.gate_up_proj", "gate.weight", "mlp.gate_proj.weight"
    matched = {p for p in all_params if any(p.endswith("." + n) for n in short)}
    if layers_out is None and matched == params_chosen:
        parameters = short
    else:
        parameters = sorted(params_chosen)
    return modules, layers_out, parameters


# Model types whose adapter configs PEFT (>= 0.18, with transformers 5) rewrites on load, taking these module
# names in ``target_modules`` for transformers 4's per-expert linears: it moves them to the fused expert tensors
# (doubling the rank of ``gate_up_proj``), so a dense MLP or shared expert named so would not be adapted. See
# peft/utils/transformers_weight_conversion.py (_MOE_TARGET_MODULE_MAPPING). tx names such modules through
# ``target_parameters`` (``mlp.gate_proj.weight``) instead: PEFT adapts the same weight, with the same keys.
PEFT_REMAPPED_MODEL_TYPES = frozenset({"qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "olmoe"})
PEFT_REMAPPED_NAMES = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def _param_site_rule(model):
    """Which sites PEFT adapts through ``target_parameters``: expert tensors and the router, and on the model types
    above every linear whose name PEFT would remap."""
    raw = getattr(model.config, "raw", None) or {}
    remapped = raw.get("model_type") in PEFT_REMAPPED_MODEL_TYPES

    def is_param_site(site) -> bool:
        if site.is_experts or site.name == ROUTER:
            return True
        return remapped and site.hf_module.rpartition(".")[2] in PEFT_REMAPPED_NAMES

    return is_param_site


def _peft_module_key(site, k: int, adapted_params: set[str]) -> str:
    """PEFT's module path of one layer's LoRA pair. PEFT nests one wrapper per adapted parameter of a module, in
    the module's parameter order: with both expert tensors adapted, ``gate_up_proj`` sits in the inner wrapper
    (``experts.base_layer``) and ``down_proj`` in the outer (``experts``)."""
    if site.is_experts and site.param == "gate_up_proj" and "down_proj" in adapted_params:
        return f"{site.hf_path(k)}.base_layer"
    return site.hf_path(k)


def _adapted_expert_params(model) -> dict[tuple[int, str], set[str]]:
    """(layer, expert module path) -> names of its adapted expert tensors."""
    out: dict[tuple[int, str], set[str]] = {}
    for site, m in lora_modules(model):
        if site.is_experts:
            for k in np.flatnonzero(m.layer_mask):
                out.setdefault((site.layer_ids[int(k)], site.hf_module), set()).add(site.param)
    return out


def peft_config(model) -> dict:
    """The ``adapter_config.json`` of the model's LoRA: only keys PEFT has read for a long time."""
    lora: LoRAConfig = model.lora_config
    targets, layers, parameters = peft_target_spec(model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        # PEFT refuses lora_dropout != 0 with target_parameters (its ParamWrapper cannot drop out the input of a
        # weight); dropout only acts in training, so the config PEFT reads says 0
        "lora_dropout": 0.0 if parameters else lora.dropout,
        "target_modules": targets,
        "use_rslora": lora.use_rslora,
        "bias": "none",
        "base_model_name_or_path": getattr(model, "name_or_path", None),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }
    if layers is not None:
        config["layers_to_transform"] = layers
    if parameters:
        config["target_parameters"] = parameters
    ranks = {(m.rank, m.scale) for _, m in lora_modules(model)}
    if ranks != {(lora.rank, lora.scale)}:  # per-module ranks (rank_pattern from a PEFT adapter): keep them
        config["rank_pattern"] = dict(lora.rank_pattern)
        config["alpha_pattern"] = dict(lora.alpha_pattern)
    return config


def save_adapter(model, path) -> Path:
    """Write the model's adapters to the folder ``path`` (created if needed); returns the folder.

    LoRA goes to ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT layout, fp32, adapted layers only);
    a connector with ``expansion_rate > 1`` to ``tx_connector_config.json`` + ``tx_connector.safetensors``. Files of
    the other kind left by an earlier save into the same folder are removed, so the folder describes this model.
    With several processes (jax.distributed) every process calls it and process 0 writes (see tx.multihost).
    """

    folder = Path(path)
    modules, connectors = lora_modules(model), connector_modules(model)
    if not modules and not connectors:
        raise AdapterError(
            "the model has no adapter to save: attach LoRA or a connector with expansion_rate > 1 first "
            "(tx.attach(model, lora=tx.LoRAConfig(...)))"
        )
    if folder.exists() and not folder.is_dir():
        raise AdapterError(f"{folder} is a file; save_adapter needs a folder")
    lora_tensors, conn_tensors = {}, {}  # gathered in every process (jax.distributed), written by process 0
    expert_params = _adapted_expert_params(model)
    for site, module in modules:
        a = host_array(module.lora_a[...]).astype(np.float32)
        b = host_array(module.lora_b[...]).astype(np.float32)
        for i in np.flatnonzero(module.layer_mask):
            i = int(i)
            adapted = expert_params.get((site.layer_ids[i], site.hf_module), set())
            key = PEFT_PREFIX + _peft_module_key(site, i, adapted)
            a_i, b_i = to_peft(a[i], b[i]) if site.is_experts else (a[i], b[i])
            lora_tensors[f"{key}.lora_A.weight"] = a_i
            lora_tensors[f"{key}.lora_B.weight"] = b_i
    conn_tensors = {key: value for key, (value, _) in _connector_tensors(model, gather=True).items()}
    if is_writer():
        try:
            _write_adapter(model, folder, lora_tensors, conn_tensors, connectors)
        finally:
            sync(f"adapter {folder}")
    else:
        sync(f"adapter {folder}")
    return folder


def _write_adapter(model, folder: Path, lora_tensors, conn_tensors, connectors) -> None:
    import tx

    meta = {"format": "pt", "tx_version": tx.__version__, "tx_format_version": str(FORMAT_VERSION)}
    sidecar = None
    if conn_tensors:
        fields = dataclasses.asdict(next(iter(connectors.values())).config)
        for name, default in _NEW_FIELDS.items():  # written only when set, so older tx still reads the rest
            if fields[name] == default:
                del fields[name]
        if fields.get("layers") is not None:
            fields["layers"] = list(fields["layers"])
        sidecar = {"format_version": FORMAT_VERSION, "tx_version": tx.__version__, **fields}

    def write(dest: Path) -> None:
        if lora_tensors:
            save_tensors(lora_tensors, dest / ADAPTER_WEIGHTS, metadata=meta)
            _write_json(dest / ADAPTER_CONFIG, peft_config(model))
        if conn_tensors:
            save_tensors(conn_tensors, dest / CONNECTOR_WEIGHTS, metadata=meta)
            _write_json(dest / CONNECTOR_CONFIG, sidecar)

    # one swap of the whole folder: a crash never leaves new weights beside an old config; other files are kept
    write_folder(folder, write, replaces=(ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONNECTOR_CONFIG, CONNECTOR_WEIGHTS))


# ---------------------------------------------------------------------------------------------------- loading


def lora_config_from_peft(data: dict, path: Path) -> LoRAConfig:
    """A :class:`LoRAConfig` from a PEFT ``adapter_config.json`` dict; options tx cannot honour are errors."""
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {data.get('peft_type')!r} is not supported; tx loads LORA adapters")
    bad = [k for k, unset in _UNSUPPORTED.items() if k in data and not unset(data[k])]
    if bad:
        shown = ", ".join(f"{k}={data[k]!r}" for k in bad)
        raise AdapterError(f"{path}: {shown} not supported by tx (tx implements plain LoRA on linear layers)")
    if data.get("layers_pattern") not in (None, "", "layers", ["layers"]):
        raise AdapterError(
            f"{path}: layers_pattern {data['layers_pattern']!r} is not supported (tx models use 'layers')"
        )
    targets = data.get("target_modules")
    parameters = data.get("target_parameters") or []
    if not isinstance(parameters, list) or not all(isinstance(t, str) for t in parameters):
        raise AdapterError(f"{path}: target_parameters must be a list of parameter names, got {parameters!r}")
    if targets is None and not parameters:
        raise AdapterError(f"{path}: target_modules is missing; cannot tell which modules the adapter adapts")
    if targets is None:
        targets = []
    if not isinstance(targets, str):
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise AdapterError(
                f"{path}: target_modules must be a list of module names or a regex string, got {targets!r}"
            )
        targets = sorted(targets)
    rslora = data.get("use_rslora")
    if rslora is not None and not isinstance(rslora, bool):
        raise AdapterError(f"{path}: use_rslora must be true or false, got {rslora!r}")
    try:
        return LoRAConfig(
            rank=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            targets=targets if targets != ALL_LINEAR else ALL_LINEAR,
            exclude=data.get("exclude_modules") or (),
            layers=data.get("layers_to_transform"),
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            use_rslora=bool(data.get("use_rslora", False)),
            target_parameters=sorted(parameters),
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
        )
    except ConfigError as exc:
        raise AdapterError(f"{path}: {exc}") from None


def connector_config_from_sidecar(data: dict, path: Path) -> ConnectorConfig:
    """A :class:`ConnectorConfig` from ``tx_connector_config.json``; a newer format version is an error."""
    import tx

    data = dict(data)
    version = data.pop("format_version", None)
    written_by = data.pop("tx_version", "unknown")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AdapterError(f"{path}: format_version must be an integer >= 1, found {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{path} was written by a newer tx (tx {written_by}, format version {version}); this tx "
            f"({tx.__version__}) reads format versions up to {FORMAT_VERSION}. Upgrade tx to load it."
        )
    fields = {f.name for f in dataclasses.fields(ConnectorConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise AdapterError(f"{path}: unknown connector fields {unknown} (written by tx {written_by})")
    try:
        return ConnectorConfig(**data)
    except ConfigError as exc:
        raise AdapterError(f"{path}: {exc}") from None


def _without_foreign_excludes(model, config: LoRAConfig) -> LoRAConfig:
    """PEFT configs often exclude modules tx never adapts (``lm_head``); drop those entries instead of failing."""
    paths = [site.hf_path(k) for site in linear_sites(model) for k in range(len(site.layer_ids))]
    if isinstance(config.exclude, str):
        keep = config.exclude if any(re.fullmatch(config.exclude, p) for p in paths) else ()
    else:
        keep = tuple(e for e in config.exclude if any(p == e or p.endswith("." + e) for p in paths))
    return dataclasses.replace(config, exclude=keep)


def _open(folder: Path, name: str, described_by: str) -> SafetensorsFile:
    path = folder / name
    if not path.is_file():
        pickles = [p.name for p in folder.glob("adapter_model.bin")] if name == ADAPTER_WEIGHTS else []
        if pickles:
            raise AdapterError(
                f"{folder} holds only {pickles[0]} (a PyTorch pickle); tx reads safetensors only, never pickles. "
                "Re-save it with PEFT: model.save_pretrained(folder, safe_serialization=True)"
            )
        raise AdapterError(f"adapter folder {folder} is missing {name} (the weights that {described_by} describes)")
    return SafetensorsFile(path)


def _assign(var: nnx.Variable, value: np.ndarray) -> None:
    """Replace a variable's value, keeping its dtype and placement (sharding)."""
    old = var[...]
    var.set_value(placed_like(np.asarray(value, dtype=old.dtype), old))


def _problems_error(folder: Path, file: str, problems: list[str]) -> AdapterError:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    return AdapterError(
        f"the adapter in {folder} does not fit this model ({file}; was it made for a different base model?):\n  - "
        + "\n  - ".join(shown)
    )


def _non_finite(file: SafetensorsFile, keys) -> list[str]:
    """Problems for tensors holding NaN or Inf (an adapter saved from a diverged run would poison every output)."""
    out = []
    for key in keys:
        if not np.isfinite(file.get(key).astype(np.float32, copy=False)).all():
            out.append(f"tensor {key!r} holds NaN or Inf values (saved after the training diverged?)")
    return out


def _load_lora(model, folder: Path, file: SafetensorsFile) -> None:
    slots = {}  # (PEFT module path, "A"/"B") -> (variable, stack index, experts or 0)
    expert_params = _adapted_expert_params(model)
    for site, module in lora_modules(model):
        experts = module.base.weight.shape[-3] if site.is_experts else 0
        for i in np.flatnonzero(module.layer_mask):
            i = int(i)
            key = _peft_module_key(site, i, expert_params.get((site.layer_ids[i], site.hf_module), set()))
            slots[(key, "A")] = (module.lora_a, i, experts)
            slots[(key, "B")] = (module.lora_b, i, experts)
    found, problems = {}, []
    for key in file.keys():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        match = _PEFT_KEY.fullmatch(name)
        slot = (match["module"], match["ab"]) if match else None
        if slot not in slots:
            prefix = model.config.hf_module_prefix
            if prefix != "model." and not name.startswith(prefix):
                problems.append(
                    f"unexpected tensor {key!r}: it adapts a module outside the language model ({prefix}*), and "
                    f"tx runs only the language model of a {model.config.architecture}"
                )
            else:
                problems.append(f"unexpected tensor {key!r}: not a LoRA matrix of a module the adapter config targets")
            continue
        if slot in found:
            problems.append(f"tensor {key!r} duplicates {found[slot]!r}")
            continue
        found[slot] = key
        var, _, experts = slots[slot]
        want, got = _peft_shape(var.shape[1:], slot[1], experts), tuple(file.shape(key))
        if want != got:
            problems.append(f"tensor {key!r} has shape {got} but this model expects {want}")
    for (module, ab), _ in slots.items():
        if (module, ab) not in found:
            problems.append(f"missing tensor '{PEFT_PREFIX}{module}.lora_{ab}.weight'")
    problems += _non_finite(file, found.values())
    if problems:
        raise _problems_error(folder, ADAPTER_WEIGHTS, problems)
    by_var: dict[int, tuple[nnx.Variable, np.ndarray]] = {}
    for slot, key in found.items():
        var, layer, experts = slots[slot]
        if id(var) not in by_var:
            by_var[id(var)] = (var, np.array(jax.device_get(var[...]), np.float32))
        value = file.get(key)
        if experts:
            value = a_from_peft(value, experts) if slot[1] == "A" else b_from_peft(value, experts)
        by_var[id(var)][1][layer] = value
    for var, value in by_var.values():
        _assign(var, value)


def _connector_tensors(model, gather: bool) -> dict[str, tuple[np.ndarray | tuple, list]]:
    """Sidecar key (``layers.attn_residual.proj``) -> (value stacked over all layers in layer order, or its shape,
    and the [(variable, its layer ids)] it is made of). Blocks of different segments fill their own layers."""
    num_layers = model.config.num_layers
    out: dict[str, tuple] = {}
    for name, _, conn, layer_ids in connector_sites(model):
        for var_path, var in nnx.to_flat_state(nnx.state(conn, nnx.Any(ConnectorParam, FrozenConnectorParam))):
            key = ".".join(["layers", name, *map(str, var_path)])
            value, parts = out.setdefault(key, (None, []))
            parts.append((var, layer_ids))
            if gather:
                if value is None:
                    value = np.zeros((num_layers, *var.shape[1:]), np.dtype(var.dtype))
                value[list(layer_ids)] = host_array(var[...])
            else:
                value = (num_layers, *var.shape[1:])
            out[key] = (value, parts)
    head = getattr(model, "streams", None)
    if connector_sites(model) and isinstance(head, HyperHead):  # native hyper-connections: the learned reduce too
        for var_path, var in nnx.to_flat_state(nnx.state(head, nnx.Any(ConnectorParam, FrozenConnectorParam))):
            key = ".".join(["head", *map(str, var_path)])
            out[key] = (host_array(var[...]) if gather else tuple(var.shape), [(var, None)])
    return out


def _peft_shape(shape: tuple, ab: str, experts: int) -> tuple:
    """PEFT's shape of one layer's LoRA matrix: tx's own for a Linear; [r * E, in] / [out, r * E] for experts."""
    if not experts:
        return tuple(shape)
    if ab == "A":
        e, r, d_in = shape
        return (r * e, d_in)
    e, d_out, r = shape
    return (d_out, r * e)


def _load_connector(model, folder: Path, file: SafetensorsFile) -> None:
    slots = _connector_tensors(model, gather=False)
    problems = []
    for key in file.keys():
        if key not in slots:
            problems.append(f"unexpected tensor {key!r}")
        elif tuple(file.shape(key)) != tuple(slots[key][0]):
            problems.append(f"tensor {key!r} has shape {tuple(file.shape(key))} but this model expects {slots[key][0]}")
    problems += [f"missing tensor {key!r}" for key in slots if key not in file.keys()]
    problems += _non_finite(file, [key for key in slots if key in file.keys()])
    if problems:
        raise _problems_error(folder, CONNECTOR_WEIGHTS, problems)
    for key, (_, parts) in slots.items():
        value = file.get(key)
        for var, layer_ids in parts:
            _assign(var, value if layer_ids is None else value[list(layer_ids)])


def load_adapter(model, path):
    """Attach the adapters saved in the folder ``path`` (by tx or by PEFT) to ``model`` and load their weights.

    The model must have no adapters yet. Everything is checked before the model is left changed: on any error
    the adapters attached here are removed again. Returns the model.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not an adapter folder (it does not exist or is a file)")
    if has_lora(model) or has_connector(model):
        raise AdapterError("load_adapter needs a model without adapters; call tx.detach(model) first")
    lora_cfg = conn_cfg = None
    lora_file, conn_file = folder / ADAPTER_CONFIG, folder / CONNECTOR_CONFIG
    if lora_file.is_file():
        lora_cfg = lora_config_from_peft(read_json_object(lora_file, AdapterError), lora_file)
    if conn_file.is_file():
        conn_cfg = connector_config_from_sidecar(read_json_object(conn_file, AdapterError), conn_file)
    if lora_cfg is None and conn_cfg is None:
        raise AdapterError(
            f"adapter folder {folder} has neither {ADAPTER_CONFIG} (a PEFT LoRA adapter) nor {CONNECTOR_CONFIG} "
            "(a tx connector)"
        )
    files = []
    try:
        lora_file = _open(folder, ADAPTER_WEIGHTS, ADAPTER_CONFIG) if lora_cfg is not None else None
        files.append(lora_file)
        conn_file = None
        if conn_cfg is not None and not conn_cfg.plain:
            conn_file = _open(folder, CONNECTOR_WEIGHTS, CONNECTOR_CONFIG)
            files.append(conn_file)
        if lora_cfg is not None and lora_cfg.exclude:
            lora_cfg = _without_foreign_excludes(model, lora_cfg)
        try:
            attach(model, lora=lora_cfg, connector=conn_cfg)
        except ConfigError as exc:
            raise AdapterError(f"the adapter in {folder} does not fit this model: {exc}") from None
        try:
            if lora_file is not None:
                _load_lora(model, folder, lora_file)
            if conn_file is not None:
                _load_connector(model, folder, conn_file)
        except BaseException:
            detach(model)
            raise
    finally:
        for f in files:
            if f is not None:
                f.close()
    return model
