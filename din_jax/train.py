"""Training DIN: the train state, jitted train and eval steps, and the train-and-evaluate loop."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from tensorboardX import SummaryWriter
from tqdm import tqdm

from din_jax import checkpoint as checkpoint_lib
from din_jax import config_check
from din_jax.metrics import StreamingMetrics
from din_jax.embedding import TABLES, RowLookup, embedded_from_rows, gather_rows, row_lookups, scatter_rows, split_tables
from din_jax.model import DIN
from din_jax.optim import Optimizer, clip_tensor, create_optimizer
from din_jax.packing import epoch_pack_size, pack_history
from din_jax.prefetch import Prefetcher
from input_pipeline import batches as batches_lib
from input_pipeline import datasets, dien
from input_pipeline.synthetic import SyntheticSpec
from input_pipeline.textio import atomic_write

Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Data:
    """The prepared data of a run: vocabularies and the encoded train and test splits."""

    data_dir: str
    vocabs: dien.Vocabularies
    train: dien.EncodedSplit
    test: dien.EncodedSplit


PRECISIONS = {"fp32": (jnp.float32, jnp.float32), "mixed_bf16": (jnp.bfloat16, jnp.float32),
              "bf16": (jnp.bfloat16, jnp.bfloat16)}  # precision -> (compute dtype, parameter dtype)


def build_model(config: ml_collections.ConfigDict, vocab_sizes: dict[str, int]) -> DIN:
    """The DIN module for `config.model`, `config.precision` and the data's vocabulary sizes."""
    m = config.model
    dtype, param_dtype = PRECISIONS[config.precision]
    return DIN(vocab_sizes=dict(vocab_sizes), embedding_dim=m.embedding_dim,
               attention_hidden=tuple(m.attention_hidden), mlp_hidden=tuple(m.mlp_hidden), mlp_out=m.mlp_out,
               batch_norm=m.batch_norm, activation=m.activation, attention=m.attention, dtype=dtype,
               param_dtype=param_dtype)


def dummy_batch(batch_size: int, max_seq_length: int) -> Batch:
    """A batch of zeros with the real shapes and dtypes, for initialisation and compilation."""
    ids = np.zeros([batch_size], np.int32)
    history = np.zeros([batch_size, max_seq_length], np.int32)
    return {"uid": ids, "mid": ids, "cat": ids, "hist_mids": history, "hist_cats": history,
            "hist_mask": history.astype(bool), "label": ids.astype(np.float32),
            "weight": np.ones([batch_size], np.float32), "user": ids}


def create_train_state(config: ml_collections.ConfigDict, model: DIN, optimizer: Optimizer) -> TrainState:
    """Parameters initialised as the seed's TF1 graph does, from `config.seed`, and fresh optimizer slots."""
    # Initialise in fp32 and cast, so every precision starts from the same numbers.
    fp32_model = model.clone(dtype=jnp.float32, param_dtype=jnp.float32)
    variables = fp32_model.init(jax.random.PRNGKey(config.seed), dummy_batch(2, config.max_seq_length))
    params = jax.tree.map(lambda p: p.astype(model.param_dtype), variables["params"])
    if config.sparse_embeddings:
        tables, dense = split_tables(params)
        slots = {name: optimizer.rows.init(table) for name, table in tables.items()}
        opt_state = {"dense": optimizer.dense.init(dense), "rows": {k: v[0] for k, v in slots.items()},
                     "tables": {k: v[1] for k, v in slots.items()}}
    else:
        opt_state = {"dense": optimizer.dense.init(params)}
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=opt_state)


def weighted_sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                                   total_weight: jax.Array | None = None) -> jax.Array:
    """Sigmoid cross-entropy summed over real rows (weight 1) / total_weight (default: their count)."""
    losses = optax.sigmoid_binary_cross_entropy(logits, labels)
    if total_weight is None:
        total_weight = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(losses * weights) / total_weight


def _split_micro(tree: Any, n: int) -> Any:
    """[B, ...] leaves -> [n, B/n, ...]: the micro-batches of a batch, for lax.scan (packed index: [1, P])."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), tree)


def _micro_inverses(lookups: dict[str, RowLookup], batch: Batch, n: int) -> dict[str, jax.Array]:
    """Each table's inverse index cut into n micro-batches: [n, lookups per micro-batch].

    With n > 1 batches are not packed, so a history column holds B * T lookups.
    """
    if n == 1:
        return {table: lookup.inverse[None] for table, lookup in lookups.items()}
    out = {}
    for table, lookup in lookups.items():
        parts, offset = [], 0
        for column in TABLES[table]:
            size = batch[column].size  # B for a target column, B * T for a history column
            parts.append(lookup.inverse[offset:offset + size].reshape(n, -1))
            offset += size
        out[table] = jnp.concatenate(parts, axis=1)
    return out


def train_step(model: DIN, optimizer: Optimizer, sparse: bool, micro_batch: int, state: TrainState, batch: Batch
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch`, gradients accumulated over `micro_batch` slices; returns state and loss.

    sparse: gradients w.r.t. the gathered embedding rows, and only those rows (and their optimizer
    slots) updated; else gradients w.r.t. whole tables (the O(vocabulary) reference path).
    """
    n = max(micro_batch, 1)
    total_weight = jnp.maximum(jnp.sum(batch["weight"]), 1.0)  # the loss is the mean over the whole batch
    tables, dense = split_tables(state.params)

    if sparse:
        lookups = row_lookups(batch, {k: v.shape[0] for k, v in tables.items()})
        variables_in = (dense, {k: gather_rows(tables[k], lookups[k].ids) for k in tables})
        micro_data = (_split_micro(batch, n), _micro_inverses(lookups, batch, n))

        def forward(diff, data, batch_stats):
            dense_params, rows = diff
            micro, inverses = data
            embedded = embedded_from_rows(rows, {k: RowLookup(lookups[k].ids, inverses[k]) for k in rows}, micro)
            variables = {"params": {**dense_params, **tables}, "batch_stats": batch_stats}
            return model.apply(variables, embedded, micro["weight"], True, method=DIN.from_embedded,
                               mutable=["batch_stats"])
    else:
        variables_in = state.params
        micro_data = _split_micro(batch, n)

        def forward(params, micro, batch_stats):
            return model.apply({"params": params, "batch_stats": batch_stats}, micro, train=True,
                               mutable=["batch_stats"])

    def loss_fn(diff, data, batch_stats):
        (logits, _), updates = forward(diff, data, batch_stats)
        micro = data[0] if sparse else data
        loss = weighted_sigmoid_cross_entropy(logits, micro["label"], micro["weight"], total_weight)
        return loss, updates.get("batch_stats", batch_stats)

    def accumulate(carry, data):
        grads, loss, batch_stats = carry
        (micro_loss, batch_stats), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(variables_in, data,
                                                                                           batch_stats)
        return (jax.tree.map(jnp.add, grads, micro_grads), loss + micro_loss, batch_stats), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), variables_in)
    (grads, loss, batch_stats), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros([], jnp.float32), state.batch_stats),
                                                 micro_data)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, variables_in)

    if sparse:
        dense_grads, row_grads = grads
        dense_updates, dense_opt = optimizer.dense.update(dense_grads, state.opt_state["dense"], dense)
        new_params = dict(optax.apply_updates(dense, dense_updates))
        new_rows_slots, new_table_slots = {}, {}
        for name, table in tables.items():
            ids = lookups[name].ids
            slot_rows = {k: v.at[ids].get(mode="clip") for k, v in state.opt_state["rows"][name].items()}
            rows, slot_rows, new_table_slots[name] = optimizer.rows.update(
                variables_in[1][name], clip_tensor(row_grads[name], optimizer.clip_norm), slot_rows,
                state.opt_state["tables"][name], state.step)
            new_params[name] = scatter_rows(table, ids, rows)
            new_rows_slots[name] = {k: scatter_rows(state.opt_state["rows"][name][k], ids, v)
                                    for k, v in slot_rows.items()}
        opt_state = {"dense": dense_opt, "rows": new_rows_slots, "tables": new_table_slots}
    else:
        updates, dense_opt = optimizer.dense.update(grads, state.opt_state["dense"], state.params)
        new_params, opt_state = optax.apply_updates(state.params, updates), {"dense": dense_opt}
    new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss}


def eval_step(model: DIN, state: TrainState, batch: Batch) -> jax.Array:
    """Click probabilities [B] for `batch` (fp32)."""
    logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch)
    return jax.nn.sigmoid(logits)


def load_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    """Prepares (built-in data) or locates (dien) the data directory and encodes both splits."""
    if config.dataset == "synthetic":
        spec_fields = {k: v for k, v in config.synthetic.to_dict().items() if k != "seed"}
        spec_fields["interests_per_user"] = tuple(spec_fields["interests_per_user"])
        data_dir = datasets.builtin_data_dir(config.data_dir or os.path.join(workdir, "data"),
                                             SyntheticSpec(**spec_fields), config.synthetic.seed, config.prepare_seed)
    else:
        data_dir = datasets.require_prepared(config.data_dir)
    vocabs = dien.load_vocabularies(data_dir)
    return Data(data_dir, vocabs, dien.load_split(data_dir, "train", vocabs), dien.load_split(data_dir, "test", vocabs))


def evaluate(eval_fn, state: TrainState, split: dien.EncodedSplit, config: ml_collections.ConfigDict) -> dict[str, float]:
    """Every metric over the whole split, each example exactly once."""
    metrics = StreamingMetrics()
    for batch in batches_lib.eval_batches(split, config.eval_batch_size, config.max_seq_length,
                                          keep=config.history_keep, boundaries=tuple(config.bucket_boundaries)):
        probs = np.asarray(eval_fn(state, batch))
        metrics.update(batch["label"], probs, batch["user"], batch["weight"])
    return metrics.compute()


def _train_batches(split: dien.EncodedSplit, config: ml_collections.ConfigDict, start_step: int) -> Iterator[Batch]:
    """Endless train batches, epoch after epoch, starting at global step `start_step` (for resuming)."""
    boundaries = tuple(config.bucket_boundaries)
    per_epoch = batches_lib.num_train_batches(split, config.batch_size, config.max_seq_length, boundaries)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        yield from batches_lib.train_batches(split, config.batch_size, config.max_seq_length, seed=config.seed,
                                             epoch=epoch, keep=config.history_keep, start_batch=skip,
                                             boundaries=boundaries)
        epoch, skip = epoch + 1, 0


def _pack_floor(split: dien.EncodedSplit, config: ml_collections.ConfigDict, granularity: int) -> int:
    """The packed history size that fits every batch of the first epoch (one compiled train shape)."""
    lengths = np.minimum(split.hist_lengths, config.max_seq_length)
    plan = batches_lib.train_plan(split, config.batch_size, config.max_seq_length, seed=config.seed, epoch=0,
                                  boundaries=tuple(config.bucket_boundaries))
    return epoch_pack_size([lengths[indices] for indices, _ in plan], granularity,
                           config.batch_size * config.max_seq_length)


class _Profiler:
    """jax.profiler trace of `num_steps` steps after the first (compiled) one: the seed's --timeline."""

    def __init__(self, num_steps: int, directory: str, first_step: int):
        self.num_steps, self.directory = num_steps, directory
        self.start, self.stop = first_step + 1, first_step + 1 + num_steps
        self.active = False

    def before(self, step: int) -> None:
        if self.num_steps > 0 and step == self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, sync: Any) -> None:
        if self.active and step + 1 >= self.stop:
            jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("Wrote a %d-step profile to %s", self.num_steps, self.directory)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The model and its steps for one config: what the loop, benchmarks and notebooks drive.

    train_step(state, batch) -> (state, {'loss'}) donates `state`; eval_step(state, batch) -> probabilities.
    Both take the numpy batches of input_pipeline.batches and pack their histories when configured.
    """

    model: DIN
    optimizer: Optimizer
    jit_train_step: Any
    jit_eval_step: Any
    pack_granularity: int  # 0: no packing
    pack_floor: int = 0    # smallest packed size: set by the loop so an epoch has one shape

    def init_state(self, config: ml_collections.ConfigDict) -> TrainState:
        """A fresh train state from `config.seed`."""
        return create_train_state(config, self.model, self.optimizer)

    def prepare(self, batch: Batch) -> Batch:
        """The batch as the jitted steps take it (history packed when configured); cheap numpy work."""
        return pack_history(batch, self.pack_granularity, self.pack_floor) if self.pack_granularity else batch

    def train_step(self, state: TrainState, batch: Batch, prepared: bool = False
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step (see the module-level train_step); `prepared` batches skip `prepare`."""
        return self.jit_train_step(state, batch if prepared else self.prepare(batch))

    def eval_step(self, state: TrainState, batch: Batch) -> jax.Array:
        """Click probabilities [B]."""
        return self.jit_eval_step(state, self.prepare(batch))


def create_trainer(config: ml_collections.ConfigDict, vocab_sizes: dict[str, int]) -> Trainer:
    """Builds the model, the optimizer and the jitted train and eval steps for `config`."""
    model = build_model(config, vocab_sizes)
    optimizer = create_optimizer(config.optimizer, config.learning_rate, config.clip_norm,
                                 decay_step=config.adagrad_decay_step, decay_rate=config.adagrad_decay_rate)
    step = functools.partial(train_step, model, optimizer, config.sparse_embeddings, config.micro_batch)
    # Packing and micro-batches do not mix (micro-batches split examples, packing splits positions).
    granularity = config.pack_granularity if config.micro_batch <= 1 else 0
    return Trainer(model, optimizer, jax.jit(step, donate_argnums=(0,)), jax.jit(functools.partial(eval_step, model)),
                   granularity)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains for `config.steps` steps (0 = one epoch), evaluates, writes metrics and checkpoints."""
    config_check.validate(config)
    os.makedirs(workdir, exist_ok=True)
    wall_start = time.perf_counter()
    data = load_data(config, workdir)
    trainer = create_trainer(config, data.vocabs.sizes)
    state = trainer.init_state(config)
    checkpointer = checkpoint_lib.Checkpointer(config.checkpoint_dir or os.path.join(workdir, "checkpoints"),
                                               config.save_steps, config.keep_checkpoint_max)
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        state = restored
        logging.info("Resumed from checkpoint at step %d", int(state.step))

    steps_per_epoch = batches_lib.num_train_batches(data.train, config.batch_size, config.max_seq_length,
                                                    tuple(config.bucket_boundaries))
    total_steps = config.steps or steps_per_epoch
    first_step = int(state.step)
    if trainer.pack_granularity:
        trainer = dataclasses.replace(trainer, pack_floor=_pack_floor(data.train, config, trainer.pack_granularity))
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    profiler = _Profiler(config.timeline, os.path.join(workdir, "profile"), first_step)
    logging.info("Data %s: %d train / %d test examples, vocabularies %s; %d steps of batch %d (%d per epoch)",
                 data.data_dir, len(data.train), len(data.test), data.vocabs.sizes, total_steps, config.batch_size,
                 steps_per_epoch)

    compile_seconds, timed_samples, timed_seconds, loss = 0.0, 0, 0.0, float("nan")
    eval_metrics: dict[str, Any] = {}
    batches: Iterator[tuple[Batch, Batch]]
    if config.smartstaged:
        batches = Prefetcher(_train_batches(data.train, config, first_step), trainer.prepare, config.prefetch_depth)
    else:
        batches = ((b, trainer.prepare(b)) for b in _train_batches(data.train, config, first_step))
    progress = tqdm(total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not config.progress_bar)
    timer = time.perf_counter()
    for step in range(first_step, total_steps):
        batch, device_batch = next(batches)
        profiler.before(step)
        state, step_metrics = trainer.train_step(state, device_batch, prepared=True)
        profiler.after(step, state.step)
        if step == first_step:  # the first step compiles: time it apart from throughput
            jax.block_until_ready(state.step)
            compile_seconds = time.perf_counter() - timer
            timer = time.perf_counter()
        else:
            timed_samples += int(batch["weight"].sum())
        progress.update(1)
        done = step + 1
        if done % config.log_every_steps == 0 or done == total_steps:
            loss = float(step_metrics["loss"])
            timed_seconds = time.perf_counter() - timer
            rate = timed_samples / timed_seconds if timed_seconds > 0 else 0.0
            progress.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:,.0f}")
            writer.add_scalar("train/loss", loss, done)
            writer.add_scalar("train/samples_per_sec", rate, done)
        if not config.no_eval and config.eval_every_steps and done % config.eval_every_steps == 0 and done < total_steps:
            _write_eval(writer, evaluate(trainer.eval_step, state, data.test, config), done)
        checkpointer.save(done, state)
    jax.block_until_ready(state)
    timed_seconds = time.perf_counter() - timer if total_steps > first_step else 0.0
    progress.close()
    if isinstance(batches, Prefetcher):
        batches.close()
    checkpointer.save(int(state.step), state, force=True)
    checkpointer.close()

    if not config.no_eval:
        eval_metrics = evaluate(trainer.eval_step, state, data.test, config)
        eval_metrics["step"] = int(state.step)
        _write_eval(writer, eval_metrics, int(state.step))
        _write_json(os.path.join(workdir, "eval_metrics.json"), eval_metrics)
    writer.close()
    summary = {"steps": int(state.step), "steps_this_run": total_steps - first_step,
               "samples_per_sec": timed_samples / timed_seconds if timed_seconds > 0 else None,
               "wall_seconds": time.perf_counter() - wall_start, "compile_seconds": compile_seconds,
               "final_train_loss": loss}
    _write_json(os.path.join(workdir, "train_summary.json"), summary)
    return {"eval": eval_metrics, "train": summary}


def _write_eval(writer: SummaryWriter, metrics: dict[str, Any], step: int) -> None:
    for name, value in metrics.items():
        if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"eval/{name}", value, step)
    logging.info("eval at step %d: %s", step, {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})


def _write_json(path: str, payload: dict[str, Any]) -> None:
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
