"""Training loop for the reference transformer (optax AdamW, early-exit loss).

Usage::

    python -m rtdlm train --config configs/models/tiny.yaml       # seconds on a CPU
    python -m rtdlm train --config configs/models/target.yaml     # about an hour on 2 CPU cores
    python -m rtdlm.models.train --config ...                     # the same

A config file has these sections (see `configs/models/*.yaml`)::

    name: target
    model: {d_model: 256, num_layers: 8, ...}     # TransformerConfig fields
    train: {batch_size: 16, seq_len: 256, ...}    # TrainConfig fields
    output_dir: runs/target                       # checkpoints, log, plot (git-ignored)
    bundled_export: rtdlm/models/weights/target.msgpack   # written only with export_bundled

Loss: next-byte cross-entropy of the last layer plus `exit_loss_weight` times
the mean cross-entropy of the early exits (`exit_layers`, each read through the
shared final norm and head, LayerSkip-style), so early exits make good drafts
for self-speculative decoding. Every `eval_every` steps the validation
bits-per-byte (cross-entropy in nats / ln 2) of every layer's exit is logged
and a sample is generated under jit with `rtdlm.decoding.generate`.

Outputs in `output_dir`: `checkpoints/` (an orbax `CheckpointManager` folder: the
float32 parameters, optimizer state and model config of the latest step; `resume`
continues from it, `load_checkpoint` reads it), `model.msgpack` (final float32
model, loadable with `rtdlm.models.load_model(path)`), `log.json` and `loss.png`
(if matplotlib is installed). A float16 copy of the final model goes to `export`
if given, and to the config's `bundled_export` path (the committed weights) only
with `export_bundled=True`.

Progress is logged to `logging.getLogger("rtdlm.models.train")`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from rtdlm.models import data as data_lib
from rtdlm.models.transformer import (
    Transformer,
    TransformerConfig,
    create_model,
    load_config,
    load_model,
    param_count,
    save_model,
)

LN2 = math.log(2.0)
CONFIG_KEYS = ("name", "model", "train", "output_dir", "bundled_export")
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data and evaluation settings (the `train:` section of a config).

    Attributes:
      batch_size, seq_len: training windows per step and their length in bytes.
      steps: number of optimizer steps.
      learning_rate: peak learning rate, reached after `warmup_steps` of linear
        warm-up, then cosine decay to `learning_rate * final_lr_ratio`.
      weight_decay: AdamW decoupled weight decay on matrices (not norm scales).
      b1, b2: Adam moment decay rates.
      grad_clip: global-norm gradient clipping threshold.
      exit_layers: early exits trained with the auxiliary loss: "all" (every
        layer below the last) or a list of ints in 1..num_layers-1.
      exit_loss_weight: weight of the mean early-exit cross-entropy.
      eval_every: steps between evaluations (validation bpb + a sample).
      eval_batches: validation batches (of `batch_size` windows) per periodic eval.
      final_eval_batches: validation batches for the final evaluation.
      log_every: steps between logged training losses.
      sample_prompt: prompt for the eval sample.
      sample_max_new_tokens: bytes generated per eval sample (0: no sample).
      sample_preset: name of a `rtdlm.sampling` preset ("balanced", ...).
      sample_temperature: overrides the preset's temperature if set.
      seed: parameter init and data order seed.
      validation_fraction: share of corpus files held out.
    """

    batch_size: int = 16
    seq_len: int = 256
    steps: int = 1000
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    exit_layers: Any = "all"
    exit_loss_weight: float = 0.5
    eval_every: int = 250
    eval_batches: int = 8
    final_eval_batches: int = 32
    log_every: int = 10
    sample_prompt: str = "def "
    sample_max_new_tokens: int = 200
    sample_preset: str = "balanced"
    sample_temperature: float | None = None
    seed: int = 0
    validation_fraction: float = 0.05

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown train config keys: {sorted(unknown)}")
        values = dict(values)
        if isinstance(values.get("exit_layers"), list):
            values["exit_layers"] = tuple(values["exit_layers"])
        return cls(**values)


def resolve_exit_layers(exit_layers: Any, num_layers: int) -> tuple[int, ...]:
    """The early exits (ints in 1..num_layers-1, sorted) named by a config value."""
    if exit_layers in (None, "none", ()):
        return ()
    if exit_layers == "all":
        return tuple(range(1, num_layers))
    layers = tuple(sorted({int(e) for e in exit_layers}))
    for e in layers:
        if not 1 <= e < num_layers:
            raise ValueError(f"exit layer {e} must be in 1..{num_layers - 1}")
    return layers


def exit_losses(
    model: Transformer, inputs: jax.Array, targets: jax.Array, exits: Sequence[int]
) -> jax.Array:
    """Cross-entropy after each layer in `exits` (ascending; may include num_layers).

    One pass through the layers: the residual stream is read out through the
    shared final norm + head at each requested exit. Returns [len(exits)] nats.
    """
    batch, length = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    hidden = model.embed(inputs)  # [B, T, D]
    losses, done = [], 0
    for layer in exits:
        hidden, _ = model.run_layers(hidden, positions, None, done, layer)
        logits = model.logits(hidden)  # [B, T, V]
        losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean())
        done = layer
    return jnp.stack(losses)


def training_loss(model, inputs, targets, exits: tuple[int, ...], exit_weight: float):
    """final CE + exit_weight * mean(early-exit CEs). Returns (loss, final CE)."""
    losses = exit_losses(model, inputs, targets, (*exits, model.num_layers))  # [E + 1]
    final = losses[-1]
    loss = final + (exit_weight * jnp.mean(losses[:-1]) if exits else 0.0)
    return loss, final


def make_optimizer(config: TrainConfig, params) -> tuple[optax.GradientTransformation, Any]:
    """AdamW with linear warm-up + cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_ratio,
    )
    # Decay matrices only (embedding, projections, head), not RMSNorm scales.
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(
            schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )
    return tx, schedule


# ----------------------------------------------------------------------------
# Checkpoints: an orbax CheckpointManager folder holding the latest step's float32
# parameters, optimizer state and model config.


def _checkpoint_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def save_checkpoint(directory: str | os.PathLike, model: Transformer, opt_state, step: int) -> None:
    """Saves a resumable checkpoint of `step` in `directory` (replacing older steps)."""
    params = nnx.state(model, nnx.Param)
    with _checkpoint_manager(directory) as manager:
        if step in manager.all_steps():  # e.g. a resumed run that had no steps left
            manager.delete(step)
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            config=ocp.args.JsonSave(model.config.to_dict()),
        ))


def latest_checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The step of the latest checkpoint in `directory`, or None if there is none."""
    if not os.path.isdir(directory):
        return None
    with _checkpoint_manager(directory) as manager:
        return manager.latest_step()


def load_checkpoint(directory: str | os.PathLike, opt_state_template=None, step: int | None = None):
    """Returns (model, opt_state or None, step) from `save_checkpoint`'s folder.

    `opt_state_template` (e.g. `tx.init(params)`) gives the optimizer state's
    structure; without it only the model and step are restored. `step` defaults
    to the latest one.
    """
    with _checkpoint_manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no training checkpoint in {directory}")
        config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        model_config = TransformerConfig.from_dict(config)
        model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
        items = {"params": ocp.args.StandardRestore(_abstract(nnx.state(model, nnx.Param)))}
        if opt_state_template is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_template))
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    nnx.update(model, restored.params)
    opt_state = restored.opt_state if opt_state_template is not None else None
    return model, opt_state, int(step)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# ----------------------------------------------------------------------------
# Evaluation.


def make_eval_fn(num_layers: int):
    """jit-compiled (model, inputs, targets) -> [num_layers] CE (nats) of every exit 1..L."""

    @jax.jit
    def eval_fn(model, inputs, targets):
        return exit_losses(model, inputs, targets, tuple(range(1, num_layers + 1)))

    return eval_fn


def evaluate(model: Transformer, eval_fn, batches) -> dict[int, float]:
    """Validation bits-per-byte of each exit layer: {layer: bpb} (layer num_layers = final)."""
    total = np.zeros(model.num_layers)
    for inputs, targets in batches:
        total += np.asarray(eval_fn(model, jnp.asarray(inputs), jnp.asarray(targets)))
    bpb = total / len(batches) / LN2
    return {layer + 1: float(v) for layer, v in enumerate(bpb)}


def sample_text(
    model: Transformer,
    prompt: str,
    *,
    seed: int = 0,
    max_new_tokens: int = 200,
    preset: str = "balanced",
    temperature: float | None = None,
) -> str:
    """Generates a continuation with `rtdlm.decoding.generate` (one compiled program).

    Returns the prompt + continuation as text.
    """
    # Imported here: the decoding package imports the model package, not the other way.
    from rtdlm import sampling
    from rtdlm.decoding import generate

    if preset not in sampling.PRESETS:
        raise ValueError(f"unknown sampling preset {preset!r}; choose from {sorted(sampling.PRESETS)}")
    config = sampling.PRESETS[preset]()
    if temperature is not None:
        config = config.replace(temperature=temperature)
    prompt_tokens = jnp.asarray(data_lib.encode(prompt))[None, :]  # [1, P]
    out = generate(
        model,
        prompt_tokens,
        key=jax.random.key(seed),
        config=config,
        max_new_tokens=max_new_tokens,
        eos_token_id=data_lib.EOS_ID,
    )
    length = int(out.lengths[0])
    return prompt + data_lib.decode(np.asarray(out.tokens[0, :length]))


# ----------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
    model: Transformer
    log: dict


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def check_config(config: Mapping[str, Any] | str | os.PathLike) -> dict:
    """Loads a training config and checks its keys and values (`ValueError` names a bad one).

    Returns it as a dict.
    """
    full_config = load_config(config)
    if not isinstance(full_config, Mapping) or not isinstance(full_config.get("model"), Mapping):
        raise ValueError("a training config is a mapping with a 'model:' section")
    unknown = sorted(set(full_config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {list(CONFIG_KEYS)}")
    TransformerConfig.from_dict(full_config["model"])
    TrainConfig.from_dict(full_config.get("train") or {})
    return dict(full_config)


def train(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    output_dir: str | None = None,
    steps: int | None = None,
    resume: bool = False,
    export: str | None = None,
    export_bundled: bool = False,
    progress: bool = True,
    corpus: data_lib.Corpus | None = None,
) -> TrainResult:
    """Trains a model from a config dict or YAML path; see the module docstring.

    Args:
      config: dict with "model", "train" and optional "name", "output_dir",
        "bundled_export" keys, or a path to such a YAML file.
      output_dir: overrides the config's output_dir (default `runs/<name>`).
      steps: overrides `train.steps` (e.g. for a quick check).
      resume: continue from the latest checkpoint in `output_dir/checkpoints`.
      export: path for a float16 copy of the final model (default: none).
      export_bundled: also write that float16 copy to the config's
        `bundled_export` path, i.e. refresh the committed bundled weights.
      progress: show a rich progress bar (on stderr).
      corpus: a preloaded corpus (default: the stdlib corpus).

    Returns:
      TrainResult(model, log), where log is what is written to log.json.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    full_config = check_config(config)
    name = full_config.get("name", "model")
    model_config = dict(full_config["model"])
    train_values = dict(full_config.get("train") or {})
    if steps is not None:
        train_values["steps"] = int(steps)
    tc = TrainConfig.from_dict(train_values)
    output_dir = output_dir or full_config.get("output_dir") or os.path.join("runs", name)
    exports = [export] if export else []
    if export_bundled:
        if not full_config.get("bundled_export"):
            raise ValueError("export_bundled: the config names no 'bundled_export' path")
        exports.append(full_config["bundled_export"])
    os.makedirs(output_dir, exist_ok=True)
    console = Console(stderr=True)

    corpus = corpus or data_lib.load_stdlib_corpus(validation_fraction=tc.validation_fraction)
    model = create_model(model_config, nnx.Rngs(tc.seed))
    num_layers = model.num_layers
    exits = resolve_exit_layers(tc.exit_layers, num_layers)
    graphdef, params = nnx.split(model, nnx.Param)
    tx, schedule = make_optimizer(tc, params)
    opt_state = tx.init(params)
    start_step = 0
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    if resume and latest_checkpoint_step(checkpoint_dir) is not None:
        model, opt_state, start_step = load_checkpoint(checkpoint_dir, opt_state)
        graphdef, params = nnx.split(model, nnx.Param)
        logger.info("resumed from %s at step %d", checkpoint_dir, start_step)

    logger.info(
        f"{name}: {param_count(model):,} parameters, {num_layers} layers, exits "
        f"{list(exits)} (weight {tc.exit_loss_weight}); corpus {corpus.summary()}"
    )

    @jax.jit
    def train_step(params, opt_state, inputs, targets):
        def loss_fn(params):
            return training_loss(
                nnx.merge(graphdef, params), inputs, targets, exits, tc.exit_loss_weight
            )

        (loss, final_ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, final_ce, optax.global_norm(grads)

    eval_fn = make_eval_fn(num_layers)
    val_batches = data_lib.fixed_batches(
        corpus.validation, tc.final_eval_batches, tc.batch_size, tc.seq_len
    )
    # Different data order after a resume, but still a deterministic function of the seed.
    batches = data_lib.batch_iterator(corpus.train, tc.batch_size, tc.seq_len,
                                      seed=tc.seed + start_step)

    log: dict[str, Any] = {
        "name": name,
        "output_dir": output_dir,
        "model": model.config.to_dict(),
        "train": {k: _jsonable(v) for k, v in dataclasses.asdict(tc).items()},
        "exit_layers": list(exits),
        "param_count": param_count(model),
        "corpus": corpus.summary(),
        "backend": jax.default_backend(),
        "history": [],
        "evals": [],
    }
    log_path = os.path.join(output_dir, "log.json")
    if start_step and os.path.exists(log_path):  # resumed: keep the earlier history
        with open(log_path, encoding="utf-8") as f:
            previous = json.load(f)
        log["history"] = [h for h in previous.get("history", []) if h["step"] <= start_step]
        log["evals"] = [
            dict(e, val_bpb_per_exit={int(k): v for k, v in e["val_bpb_per_exit"].items()})
            for e in previous.get("evals", []) if e["step"] <= start_step
        ]

    def run_eval(step: int, num_batches: int) -> dict:
        current = nnx.merge(graphdef, params)
        bpb = evaluate(current, eval_fn, val_batches[:num_batches])
        entry = {"step": step, "val_bpb": bpb[num_layers], "val_bpb_per_exit": bpb}
        if tc.sample_max_new_tokens > 0:
            entry["sample"] = sample_text(
                current, tc.sample_prompt, seed=tc.seed + step,
                max_new_tokens=tc.sample_max_new_tokens, preset=tc.sample_preset,
                temperature=tc.sample_temperature,
            )
        exits_text = " ".join(f"L{k}={v:.3f}" for k, v in bpb.items())
        logger.info(f"step {step}: val bpb {bpb[num_layers]:.4f} (exits {exits_text})")
        if entry.get("sample") is not None:
            logger.info("sample:\n%s", entry["sample"])
        log["evals"].append(entry)
        return entry

    # After a resume, wall time continues from the earlier run's (compute actually lost
    # between its last checkpoint and its end is not counted).
    resumed_elapsed = log["history"][-1]["elapsed_s"] if log["history"] else 0.0
    start_time = time.time() - resumed_elapsed
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} step/s"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task(f"train {name}", total=tc.steps, completed=start_step,
                            loss="-", rate="-")
        step_timer = time.time()
        for step in range(start_step + 1, tc.steps + 1):
            inputs, targets = next(batches)
            params, opt_state, loss, final_ce, grad_norm = train_step(
                params, opt_state, jnp.asarray(inputs), jnp.asarray(targets)
            )
            if step % tc.log_every == 0 or step == tc.steps:
                loss, final_ce = float(loss), float(final_ce)  # one host sync per log
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}")
                rate = tc.log_every / max(time.time() - step_timer, 1e-9)
                step_timer = time.time()
                log["history"].append({
                    "step": step, "loss": loss, "train_bpb": final_ce / LN2,
                    "grad_norm": float(grad_norm), "lr": float(schedule(step - 1)),
                    "elapsed_s": time.time() - start_time,
                })
                bar.update(task, loss=f"{loss:.3f}", rate=f"{rate:.2f}")
                if not progress or not console.is_terminal:  # e.g. output to a log file
                    logger.info(f"step {step} loss {loss:.4f} bpb {final_ce / LN2:.3f} {rate:.2f} step/s")
            bar.update(task, completed=step)
            if step % tc.eval_every == 0 and step != tc.steps:
                run_eval(step, tc.eval_batches)
                save_checkpoint(checkpoint_dir, nnx.merge(graphdef, params), opt_state, step)
                _write_outputs(output_dir, log)
                step_timer = time.time()

    train_time = time.time() - start_time
    model = nnx.merge(graphdef, params)
    final = run_eval(tc.steps, tc.final_eval_batches)
    log["train_wall_time_s"] = train_time
    log["final"] = {
        "val_bpb": final["val_bpb"], "val_bpb_per_exit": final["val_bpb_per_exit"],
        "eval_windows": tc.final_eval_batches * tc.batch_size,
    }
    save_checkpoint(checkpoint_dir, model, opt_state, tc.steps)
    save_model(model, os.path.join(output_dir, "model.msgpack"), dtype=None)
    for path in exports:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_model(model, path, dtype="float16", metadata={
            "name": name, "steps": tc.steps, "train_wall_time_s": round(train_time, 1),
            "val_bpb_per_exit": final["val_bpb_per_exit"], "corpus": corpus.summary(),
        })
        # Quality of the float16 file as loaded (cast back to float32).
        export_bpb = evaluate(load_model(path), eval_fn, val_batches[: tc.final_eval_batches])
        log["final"]["export"] = path
        log["final"]["export_val_bpb_per_exit"] = export_bpb
        logger.info(f"exported float16 weights to {path}: val bpb {export_bpb[num_layers]:.4f}")
    if not _write_outputs(output_dir, log):
        logger.info("loss.png skipped: matplotlib is not installed (pip install matplotlib)")
    logger.info(f"done in {train_time:.0f} s; outputs in {output_dir}")
    return TrainResult(model=model, log=log)


def _write_outputs(output_dir: str, log: dict) -> bool:
    """Writes log.json and, if matplotlib is installed, loss.png (train loss; validation
    bpb of each exit). Returns whether the plot was written."""
    with open(os.path.join(output_dir, "log.json"), "w", encoding="utf-8") as f:
        json.dump(log, f, indent=1)
    try:
        import matplotlib
    except ImportError:  # plots are optional (the dev extras)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if log["history"]:
        steps = [h["step"] for h in log["history"]]
        ax.plot(steps, [h["train_bpb"] for h in log["history"]], label="train bpb (final layer)",
                color="0.6", linewidth=1)
    if log["evals"]:
        steps = [e["step"] for e in log["evals"]]
        layers = sorted(log["evals"][-1]["val_bpb_per_exit"])
        for layer in layers:
            ax.plot(steps, [e["val_bpb_per_exit"][layer] for e in log["evals"]], marker="o",
                    markersize=3, label=f"val bpb, exit {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{log['name']}: {log['param_count']:,} parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "loss.png"), dpi=110)
    plt.close(fig)
    return True


def train_main(argv: Sequence[str] | None = None) -> int:
    """`python -m rtdlm.models.train [options]`: the same as `python -m rtdlm train [options]`."""
    from rtdlm.__main__ import main

    return main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(train_main())
