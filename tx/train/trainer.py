"""The training loop: optax AdamW on adapter state only, one jitted step compiled once.

``Trainer(model, config).step(batch)`` runs one optimiser update (with ``grad_accum`` micro-batches
scanned inside the same compiled function) and returns its metrics; ``fit(train, eval_data)`` runs
the loop with a progress bar, metrics in ``<out>/metrics.jsonl``, periodic eval, atomic checkpoints
every ``save_every`` steps, exact resume and a stop with a clear message on a non-finite loss.

Every file of a run folder is written to a temporary name and renamed into place (checkpoints as whole
folders, see :mod:`tx.train.checkpoint`), except ``metrics.jsonl``: it grows by one appended line per logged
step (rewriting it each step would cost time quadratic in the run length). A line cut short by a crash, and
every line past the checkpoint a run resumes from, are dropped when the run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tx.errors import CheckpointError, ConfigError, TxError
from tx.models.moe import load_balancing_loss, router_metrics
from tx.multihost import agree, is_writer
from tx.safetensors_io import atomic_write_bytes, write_error
from tx.sharding import batch_sharding, on_mesh, shard_state, tx_mesh
from tx.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_info,
    remove_checkpoint,
    remove_stale,
    save_checkpoint,
)
from tx.train.loss import model_loss_sum, model_loss_terms

RUN_MARKER = "tx_run.json"
# TrainConfig fields that decide which batch each step sees: a resumed run must keep them to continue exactly.
DATA_FIELDS = ("batch_size", "seq_len", "seed", "pack", "eval_fraction")
# Fields that change the optimiser's trajectory: a resumed run may change them, with a warning.
SCHEDULE_FIELDS = ("steps", "lr", "connector_lr", "schedule", "warmup_steps", "weight_decay", "grad_clip", "grad_accum")


class TrainingDiverged(TxError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """Everything the ``tx finetune`` flags hold. Learning rates are peak values of the schedule."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 2e-4
    connector_lr: float | None = None  # None: same as lr
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    remat: bool = False
    scan_layers: bool = True  # False: unroll the layers (slower to compile, faster steps; see tx.models.decoder)
    seed: int = 0
    pack: str = "pack"  # "pack" | "pad"
    eval_fraction: float = 0.0  # carve an eval split out of the training data when no eval data is given
    eval_every: int = 0  # 0: only at the end
    eval_batches: int | None = None
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    loss_chunk: int = 2048
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    # load-balancing loss of MoE routers: None = the checkpoint's router_aux_loss_coef when the router has LoRA,
    # else 0; a number applies it whatever trains
    router_aux_loss_coef: float | None = None

    def __post_init__(self):
        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        positive = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "loss_chunk", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "connector_lr", "weight_decay", "router_aux_loss_coef"):
            value = getattr(self, name)
            if (value is not None or name == "weight_decay") and not (is_number(value) and value >= 0):
                raise ConfigError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("remat", "scan_layers", "resume", "overwrite", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.pack not in ("pack", "pad"):
            raise ConfigError(f"TrainConfig.pack must be 'pack' or 'pad', got {self.pack!r}")
        if not (is_number(self.eval_fraction) and 0.0 <= self.eval_fraction < 1.0):
            raise ConfigError(f"TrainConfig.eval_fraction must be a number in [0, 1), got {self.eval_fraction!r}")
        if self.grad_clip is not None and not (is_number(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError(f"TrainConfig.grad_clip must be a number > 0 or None, got {self.grad_clip!r}")
        if self.eval_batches is not None and not (is_int(self.eval_batches) and self.eval_batches >= 1):
            raise ConfigError(f"TrainConfig.eval_batches must be an integer >= 1 or None, got {self.eval_batches!r}")
        if self.out is not None and not isinstance(self.out, (str, os.PathLike)):
            raise ConfigError(f"TrainConfig.out must be a folder path or None, got {self.out!r}")
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise ConfigError(f"TrainConfig.warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum}): "
                "each step splits the batch into grad_accum equal micro-batches"
            )
        if self.resume and self.overwrite:
            raise ConfigError(
                "TrainConfig.resume and overwrite conflict: resume continues the run in out, overwrite replaces it; "
                "pass one of them"
            )
        if self.out is None:
            for name in ("resume", "overwrite", "save_every"):
                if getattr(self, name):
                    raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} needs out (the run folder)")

    def schedule_fn(self, peak: float) -> optax.Schedule:
        if self.schedule == "constant":
            if self.warmup_steps:
                return optax.join_schedules(
                    [optax.linear_schedule(0.0, peak, self.warmup_steps), optax.constant_schedule(peak)],
                    [self.warmup_steps],
                )
            return optax.constant_schedule(peak)
        return (
            optax.warmup_cosine_decay_schedule(0.0, peak, self.warmup_steps, max(self.steps, 1), peak * 0.1)
            if self.warmup_steps
            else optax.cosine_decay_schedule(peak, max(self.steps, 1), 0.1)
        )


def _with_defaults(part: str, fields: dict | None) -> dict | None:
    """A checkpoint's adapter config with the fields it predates filled in with their defaults (JSON values)."""
    from tx.adapters.connector import ConnectorConfig
    from tx.adapters.lora import LoRAConfig

    cls = {"lora": LoRAConfig, "connector": ConnectorConfig}.get(part)
    if fields is None or cls is None:
        return fields
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    defaults = json.loads(json.dumps(defaults, default=str))
    return {**{k: v for k, v in defaults.items() if k not in ("init", "seed") or part != "lora"}, **fields}


def _router_aux_coef(model, config: TrainConfig) -> float:
    """The load-balancing loss weight (see :attr:`TrainConfig.router_aux_loss_coef`)."""
    if config.router_aux_loss_coef is not None:
        return float(config.router_aux_loss_coef)
    moe = getattr(model.config, "moe", None)
    if moe is None:
        return 0.0
    from tx.adapters.attach import lora_modules

    router_trains = any(site.name == "gate" for site, _ in lora_modules(model))
    return float(moe.router_aux_loss_coef) if router_trains else 0.0


def trainable_filters():
    """(LoRA filter, connector filter): the two groups of trainable state, each with its own learning rate."""
    from tx.adapters.connector import ConnectorParam
    from tx.adapters.lora import LoRAParam

    return LoRAParam, ConnectorParam


class Trainer:
    """Fine-tunes the adapters attached to ``model`` (see :func:`tx.attach`); the base stays frozen."""

    def __init__(self, model, config: TrainConfig | None = None, *, mesh=None, mesh_axes=None):
        """``mesh``: any ``jax.sharding.Mesh`` (the one the model was loaded with); ``mesh_axes`` as in
        :func:`tx.load_model` (which mesh axis plays "fsdp", "tp", "expert"; see :mod:`tx.sharding`)."""
        self.model = model
        self._tb = None  # TensorBoard writer of the current fit(), when tensorboardX is installed
        self.config = config = config or TrainConfig()
        self.mesh = mesh = tx_mesh(mesh, mesh_axes)
        model.remat = config.remat
        model.scan_layers = config.scan_layers
        lora_f, conn_f = trainable_filters()
        # random state (LoRA dropout keys) advances every step, so it travels through the step like the adapters
        self.graphdef, lora, conn, self.rng, self.rest = nnx.split(model, lora_f, conn_f, nnx.RngState, ...)
        if mesh is not None:  # every trained value on the mesh (the connector's are made unplaced), by its axes
            for state in (lora, conn, self.rng):
                shard_state(mesh, state)
        if not jax.tree.leaves(lora) and not jax.tree.leaves(conn):
            raise ConfigError(
                "the model has nothing to train: attach LoRA and/or a trainable connector first, "
                "e.g. tx.attach(model, lora=tx.LoRAConfig(rank=8))"
            )
        self.states = {"lora": lora, "connector": conn}
        self.schedules = {
            "lora": config.schedule_fn(config.lr),
            "connector": config.schedule_fn(config.lr if config.connector_lr is None else config.connector_lr),
        }
        self.optimizers = {
            k: optax.adamw(s, b1=0.9, b2=0.999, weight_decay=config.weight_decay) for k, s in self.schedules.items()
        }
        self.opt_state = {k: self.optimizers[k].init(self.states[k]) for k in self.states}
        self.aux_coef = _router_aux_coef(model, config)
        self.step_count = 0
        self.clock = time.perf_counter  # read once per log record (a test may replace it)
        self._train_step = jax.jit(self._step_fn, donate_argnums=(0, 1, 2))
        self._eval_step = jax.jit(self._eval_fn)

    # ---- the compiled functions -------------------------------------------------------------
    def _loss(self, states, rng, rest, batch):
        # copy=True: fresh Variables at this trace level (inside value_and_grad); LoRA dropout advances its
        # keys in place, and nnx refuses to mutate a Variable created at the outer (jit) level
        model = nnx.merge(self.graphdef, states["lora"], states["connector"], rng, rest, copy=True)
        total, count, router = model_loss_terms(model, batch, self.config.loss_chunk)
        objective = total
        if router is not None and self.aux_coef:  # a mean over tokens after the division by the loss tokens
            objective = total + self.aux_coef * load_balancing_loss(router) * count
        return objective, (count, nnx.state(model, nnx.RngState), total, router)

    def _step_fn(self, states, opt_state, rng, rest, batches, step):
        """batches: dict of [accum, B, S] arrays. Returns (states, opt_state, rng, metrics)."""

        def grads_of(rng, mb):  # -> (gradient sums, loss sum, loss tokens, advanced rng, router sums) of a micro-batch
            (_, (count, rng, loss, router)), grads = jax.value_and_grad(self._loss, has_aux=True)(states, rng, rest, mb)
            return grads, loss, count, rng, router

        def micro(carry, mb):
            grads, loss, count, rng, router = carry
            g, part, n, rng, r = grads_of(rng, mb)
            router = None if r is None else router + r
            return (jax.tree.map(jnp.add, grads, g), loss + part, count + n, rng, router), None

        if jax.tree.leaves(batches)[0].shape[0] == 1:  # no accumulation: no loop, no zero-filled sums
            grads, loss, count, rng, router = grads_of(rng, jax.tree.map(lambda a: a[0], batches))
        else:
            zeros = jax.tree.map(jnp.zeros_like, states)
            first = jax.eval_shape(grads_of, rng, jax.tree.map(lambda a: a[0], batches))[4]
            router = None if first is None else jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)
            init = (zeros, jnp.zeros(()), jnp.zeros(()), rng, router)
            (grads, loss, count, rng, router), _ = jax.lax.scan(micro, init, batches)
        denom = jnp.maximum(count, 1.0)
        norm = optax.tree.norm(grads) / denom
        scale = 1.0 / denom  # the mean over loss tokens and the clipping in one multiply
        if self.config.grad_clip is not None:
            scale = scale * jnp.minimum(1.0, self.config.grad_clip / (norm + 1e-6))
        grads = jax.tree.map(lambda g: g * scale, grads)
        new_states, new_opt = {}, {}
        for k, opt in self.optimizers.items():
            updates, new_opt[k] = opt.update(grads[k], opt_state[k], states[k])
            new_states[k] = optax.apply_updates(states[k], updates)
        metrics = {"loss": loss / denom, "grad_norm": norm, "loss_tokens": count, "lr": self.schedules["lora"](step)}
        if router is not None:  # MoE: how evenly the experts were used, summed over the MoE layers
            metrics.update(router_metrics(router))
        return new_states, new_opt, rng, metrics

    def _eval_fn(self, states, rng, rest, batch):
        model = nnx.merge(self.graphdef, states["lora"], states["connector"], rng, rest, copy=True)
        model.eval()  # no dropout
        return model_loss_sum(model, batch, self.config.loss_chunk)

    # ---- public API -------------------------------------------------------------------------
    def _prepare(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        batch = _check_batch(batch, self.model.config.vocab_size)
        a = self.config.grad_accum
        out = {}
        for k, v in batch.items():
            if v.shape[0] % a:
                raise ConfigError(f"batch of {v.shape[0]} rows cannot be split into grad_accum={a} micro-batches")
            v = v.reshape(a, v.shape[0] // a, *v.shape[1:])
            if self.mesh is not None:
                v = jax.device_put(v, batch_sharding(self.mesh, v.ndim, v.shape[1]))
            out[k] = v
        return out

    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimiser update on ``batch`` (dict of [B, S] arrays from :class:`tx.train.data.Dataset`)."""
        batches = self._prepare(batch)
        with on_mesh(self.mesh):
            self.states, self.opt_state, self.rng, metrics = self._train_step(
                self.states, self.opt_state, self.rng, self.rest, batches, jnp.asarray(self.step_count)
            )
        self.step_count += 1
        self._sync_model()
        return metrics

    def _sync_model(self):
        nnx.update(self.model, self.states["lora"], self.states["connector"], self.rng)

    def evaluate(self, data, max_batches: int | None = None) -> float:
        """Mean token loss over ``data.eval_batches()`` (all rows, fixed order)."""
        total, count = 0.0, 0.0
        for i, batch in enumerate(data.eval_batches()):
            if max_batches is not None and i >= max_batches:
                break
            with on_mesh(self.mesh):
                s, n = self._eval_step(self.states, self.rng, self.rest, {k: jnp.asarray(v) for k, v in batch.items()})
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    def fit(self, train_data, eval_data=None, tokenizer=None) -> dict[str, Any]:
        """Run ``config.steps`` updates. ``train_data``/``eval_data``: Datasets, or (with ``tokenizer``) paths,
        hub dataset ids, :class:`tx.train.data.Source` (path, split, column mapping) or lists of records."""
        from tqdm.auto import tqdm

        cfg = self.config
        train_data, eval_data = self._datasets(train_data, eval_data, tokenizer)
        out = Path(cfg.out) if cfg.out else None
        history: list[dict[str, Any]] = []
        if out is not None:
            failure = None
            if is_writer():  # process 0 prepares the folder; the others wait for it (tx.multihost)
                try:
                    self._prepare_out(out)
                except BaseException as exc:
                    failure = exc
            agree(failure is None, f"prepare the run folder {out}")
            if failure is not None:
                raise failure
        start = self.step_count
        saved = None  # the step of a checkpoint already on disk for the current state
        if out is not None and cfg.resume:
            start = self.restore(out)
            saved = start if latest_checkpoint(out / "checkpoints") is not None else None
        writer = out is not None and is_writer()
        metrics_file = out / "metrics.jsonl" if writer else None
        self._tb = _tensorboard(out) if writer else None
        if metrics_file is not None:
            _truncate_metrics(metrics_file, start)
        show = cfg.progress and is_writer()
        lines = show and not _is_terminal(sys.stderr)  # a log file or CI: one plain line per log interval
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            disable=not show or lines,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        t0, tokens = self.clock(), 0.0  # tokens: real tokens of the steps dispatched since the last pending record
        pending = None  # (metrics, step, tokens of the steps since the last record) of a step not yet flushed
        last_good = start

        def flush(pending_metrics, step_done, interval_tokens):
            nonlocal t0
            m = {k: float(v) for k, v in jax.device_get(pending_metrics).items()}
            if not math.isfinite(m["loss"]):
                raise TrainingDiverged(
                    f"loss became {m['loss']} at step {step_done}; stopping. The last good checkpoint "
                    f"(step {last_good}) is kept{' in ' + str(out / 'checkpoints') if out else ''}. "
                    "Lower --lr or check the data."
                )
            now = self.clock()  # the step's metrics are on the host: it has finished
            # throughput of the steps since the last record: their real (non-padding) tokens over their time
            rec = {"step": step_done, **m, "tokens_per_s": interval_tokens / (now - t0) if now > t0 else 0.0}
            t0 = now
            history.append(rec)
            if metrics_file is not None:
                _append_line(metrics_file, rec, self._tb)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if lines:
                print(
                    f"train step {step_done}/{cfg.steps} loss {m['loss']:.4f} tok/s {rec['tokens_per_s']:.0f}",
                    file=sys.stderr,
                    flush=True,
                )
            return rec

        try:
            for step in range(start, cfg.steps):
                batch = train_data.batch(step)
                metrics = self.step(batch)
                tokens += float(np.count_nonzero(np.asarray(batch["segment_ids"]))) if "segment_ids" in batch else 0.0
                bar.update(1)
                if pending is not None:
                    flush(*pending)
                    pending = None
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    pending, tokens = (metrics, step + 1, tokens), 0.0
                done = step + 1
                if eval_data is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    if pending is not None:
                        flush(*pending)
                        pending = None
                    self._log_eval(eval_data, done, metrics_file, history)
                if out is not None and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    if pending is not None:
                        flush(*pending)
                        pending = None
                    self._check_finite(done, last_good, out)
                    self.save(out)
                    last_good = done
            if pending is not None:
                flush(*pending)
        finally:
            bar.close()
        result = {"history": history}
        if eval_data is not None:
            result["eval_loss"] = self._log_eval(eval_data, self.step_count, metrics_file, history)
        if out is not None:
            self._check_finite(self.step_count, last_good, out)
            if saved != self.step_count:  # a run resumed after its last checkpoint only needs its adapter written
                self.save(out)
            from tx.adapters.io import save_adapter

            save_adapter(self.model, out / "adapter")
        return result

    def _log_eval(self, eval_data, step, metrics_file, history):
        loss = self.evaluate(eval_data, self.config.eval_batches)
        rec = {"step": step, "eval_loss": loss}
        history.append(rec)
        if metrics_file is not None:
            _append_line(metrics_file, rec, self._tb)
        return loss

    def _check_finite(self, step, last_good, out):
        leaves = jax.tree.leaves(self.states)
        if not all(bool(jnp.isfinite(x).all()) for x in leaves):
            raise TrainingDiverged(
                f"adapter parameters are NaN or Inf at step {step}; not saving. The last good checkpoint "
                f"(step {last_good}) is kept in {out / 'checkpoints'}."
            )

    def _datasets(self, train_data, eval_data, tokenizer):
        from tx.train.data import datasets_for_fit

        cfg = self.config
        return datasets_for_fit(
            train_data,
            eval_data,
            tokenizer,
            eval_fraction=cfg.eval_fraction,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            mode=cfg.pack,
            max_positions=self.model.config.max_positions,
            vocab_size=self.model.config.vocab_size,
        )

    def _prepare_out(self, out: Path):
        marker = out / RUN_MARKER
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output folder {out} is a file; choose another --out")
        # a marker write cut short by a crash leaves only its temporary file: still our run folder
        contents = [p for p in out.iterdir() if not p.name.startswith(f".{RUN_MARKER}.tmp-")] if out.exists() else []
        if contents and not marker.exists() and not self.config.overwrite:
            raise ConfigError(
                f"output folder {out} exists and is not a tx run; choose another --out or pass --overwrite"
            )
        if (
            marker.exists()
            and not self.config.resume
            and not self.config.overwrite
            and latest_checkpoint(out / "checkpoints")
        ):
            raise ConfigError(
                f"{out} already holds a tx run; pass --resume to continue it or --overwrite to replace it"
            )
        if out.is_dir():
            remove_stale(out)  # folders a run killed while replacing its checkpoints left behind
        if self.config.overwrite and (out / "checkpoints").exists():
            remove_checkpoint(out / "checkpoints")  # renamed aside first: a crash never leaves half a checkpoint
            (out / "metrics.jsonl").unlink(missing_ok=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(out, exc) from None
        info = {"tx_run": 1, "config": dataclasses.asdict(self.config)}
        atomic_write_bytes(marker, lambda p: Path(p).write_text(json.dumps(info, indent=2, default=str)))

    def adapter_setup(self) -> dict[str, Any]:
        """The model's LoRA and connector configs as JSON values (stored in checkpoints, compared on resume).

        LoRA's ``init`` and ``seed`` are left out: they only pick the starting values, which a resume replaces.
        """
        setup = {}
        for name in ("lora_config", "connector_config"):
            config = getattr(self.model, name, None)
            fields = dataclasses.asdict(config) if config is not None else None
            if fields is not None and name == "lora_config":
                fields = {k: v for k, v in fields.items() if k not in ("init", "seed")}
            setup[name.removesuffix("_config")] = fields
        return json.loads(json.dumps(setup, default=str))

    def save(self, out: Path) -> Path:
        """Write a checkpoint of the adapters and optimiser state under ``out/checkpoints``."""
        info = {"config": dataclasses.asdict(self.config), "adapters": self.adapter_setup()}
        states = {**self.states, "rng": self.rng}
        return save_checkpoint(
            Path(out) / "checkpoints", self.step_count, states, self.opt_state, info, keep=self.config.keep_checkpoints
        )

    def restore(self, out: Path) -> int:
        """Load the newest complete checkpoint under ``out/checkpoints``; returns its step (0 if none)."""
        path = latest_checkpoint(Path(out) / "checkpoints")
        if path is None:
            return self.step_count
        self._check_resumable(path, read_info(path))
        self.opt_state, info = load_checkpoint(path, {**self.states, "rng": self.rng}, self.opt_state)
        self.step_count = int(info["step"])
        self._sync_model()
        return self.step_count

    def _check_resumable(self, path: Path, info: dict[str, Any]) -> None:
        """A checkpoint of another adapter setup, or of other data settings, cannot be continued exactly."""
        saved = info.get("adapters")
        if saved is not None:  # fields added since a checkpoint was written are at their defaults there
            saved = {part: _with_defaults(part, fields) for part, fields in saved.items()}
        if saved is not None and saved != self.adapter_setup():
            now = self.adapter_setup()
            diffs = []
            for part in ("lora", "connector"):
                a, b = saved.get(part), now.get(part)
                if a is None or b is None:
                    if a != b:
                        diffs.append(
                            f"{part}: checkpoint {'none' if a is None else a}, model {'none' if b is None else b}"
                        )
                    continue
                diffs += [
                    f"{part}.{k}: checkpoint {a.get(k)!r}, model {b.get(k)!r}"
                    for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)
                ]
            raise CheckpointError(
                f"{path} was written for a different adapter setup than the model's; resume with the same LoRA and "
                "connector options, or start a new run (another --out, or --overwrite):\n  - " + "\n  - ".join(diffs)
            )
        old = info.get("config") or {}
        new = dataclasses.asdict(self.config)
        changed = [k for k in DATA_FIELDS if k in old and old[k] != new[k]]
        if changed:
            shown = ", ".join(f"{k}={old[k]!r} (now {new[k]!r})" for k in changed)
            raise ConfigError(
                f"cannot resume {path} exactly: the run used {shown}, which decide the batch of every step; "
                "resume with the run's values or start a new run (another --out, or --overwrite)"
            )
        changed = [k for k in SCHEDULE_FIELDS if k in old and old[k] != new[k]]
        if changed:
            warnings.warn(
                f"resuming {path} with changed settings: "
                + ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed)
                + "; the run will not match an uninterrupted one",
                stacklevel=3,
            )


BATCH_KEYS = ("input_ids", "targets", "loss_mask")  # plus optional "positions", "segment_ids"


def _check_batch(batch, vocab_size: int) -> dict[str, np.ndarray]:
    """A batch as host arrays, after checking what a compiled step cannot: keys, shapes and token ids.

    An id outside the vocabulary would not fail inside XLA (gathers clamp), it would silently train on garbage.
    """
    from collections.abc import Mapping

    from tx.errors import DataError

    if not isinstance(batch, Mapping) or any(k not in batch for k in BATCH_KEYS):
        found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(
            f"a batch must be a dict of [batch, seq] arrays with keys {', '.join(BATCH_KEYS)} (optionally positions, "
            f"segment_ids), as tx.train.data.Dataset.batch() returns; got {found}"
        )
    batch = {k: np.asarray(v) for k, v in batch.items()}
    shape = batch["input_ids"].shape
    if len(shape) != 2 or 0 in shape:
        raise ConfigError(f"batch['input_ids'] must be a non-empty [batch, seq] array, got shape {shape}")
    for k, v in batch.items():
        if v.shape != shape:
            raise ConfigError(f"batch[{k!r}] has shape {v.shape} but batch['input_ids'] has {shape}")
    used = batch["segment_ids"] > 0 if "segment_ids" in batch else np.ones(shape, bool)  # padding is never used
    for k in ("input_ids", "targets"):
        if not np.issubdtype(batch[k].dtype, np.integer):
            raise ConfigError(f"batch[{k!r}] must hold integer token ids, got dtype {batch[k].dtype}")
        ids = batch[k][used]
        if not ids.size:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise DataError(
                f"batch[{k!r}] holds token id {bad}, outside the model's vocabulary [0, {vocab_size}): the "
                "tokenizer does not match the model"
            )
    return batch


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _tensorboard(out: Path):
    """A tensorboardX writer for ``<out>/tensorboard`` when tensorboardX is installed, else None."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _append_line(path: Path, record: dict[str, Any], tensorboard=None) -> None:
    """Append one JSON line to ``path`` (metrics.jsonl); a crash can cut only this last line, dropped on resume.

    The same scalars go to ``tensorboard`` (a tensorboardX writer) when given.
    """
    if tensorboard is not None:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                tensorboard.add_scalar(key, value, record["step"])
        tensorboard.flush()
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise write_error(path, exc) from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep metric lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_bytes(path, lambda p: Path(p).write_text("".join(x + "\n" for x in keep)))


def finetune(
    model, train_data, *, tokenizer=None, eval_data=None, mesh=None, mesh_axes=None, **config
) -> dict[str, Any]:
    """The common case in one call: ``Trainer(model, TrainConfig(**config)).fit(train_data, eval_data)``."""
    trainer = Trainer(model, TrainConfig(**config), mesh=mesh, mesh_axes=mesh_axes)
    return trainer.fit(train_data, eval_data, tokenizer=tokenizer)
