"""Training DIN: the data of a run, its input sources, evaluation, checkpoints and the train-and-evaluate loop
(the steps: din_jax.steps; the Trainer that jits them: din_jax.trainer)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from din_jax import checkpoint as checkpoint_lib
from din_jax import config_check, ev, host_memory, jsonfile, parallel, plots
from din_jax import incremental as incremental_lib
from din_jax.feed import WorkQueueFeed
from din_jax.host_embeddings import RAW_ID_KINDS, table_kinds, uses_raw_ids
from din_jax.metrics import StreamingMetrics
from din_jax.model import TABLES
from din_jax.prefetch import Prefetcher
from din_jax.progress import progress_bar
from din_jax.steps import TrainState
from din_jax.trainer import Trainer, create_trainer
from input_pipeline import batches as batches_lib
from input_pipeline import datasets, dien, mapped
from input_pipeline.synthetic import SyntheticSpec

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Data:
    """The prepared data of a run: the vocabularies' sizes and the encoded train and test splits.

    The token -> id dictionaries themselves are not kept (0.6 GB at Taobao's 4M items); whatever needs them
    (export, predict) reads them with dien.load_vocabularies(data_dir).
    """

    data_dir: str
    vocab_sizes: dict[str, int]
    train: dien.EncodedSplit
    test: dien.EncodedSplit
    # Raw-id embedding kinds (config.ev ...): the splits encode every distinct token (dien.open_vocabularies);
    # raw_ids[feature] is the 64-bit hash of each encoded token, id_sizes the encoded ids per feature.
    raw_ids: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    id_sizes: dict[str, int] = dataclasses.field(default_factory=dict)


def load_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    """Prepares (built-in data) or locates (dien) the data directory and encodes both splits."""
    if config.dataset == "synthetic":
        spec_fields = {k: v for k, v in config.synthetic.to_dict().items() if k != "seed"}
        spec_fields["interests_per_user"] = tuple(spec_fields["interests_per_user"])
        data_dir = datasets.builtin_data_dir(config.data_dir or os.path.join(workdir, "data"),
                                             SyntheticSpec(**spec_fields), config.synthetic.seed, config.prepare_seed)
    else:
        data_dir = datasets.require_prepared(config.data_dir)
    if config.history_keep == "auto":  # resolved here, so config.json and exports record the value used
        config.history_keep = dien.default_history_keep(data_dir)
    vocabs = dien.load_vocabularies(data_dir)
    encoding, raw_ids = vocabs, {}
    if uses_raw_ids(config):
        encoding = dien.open_vocabularies(data_dir, vocabs)
        raw_ids = {table.removesuffix("_table"): ev.hash_tokens(dien.tokens_by_id(
                   getattr(encoding, table.removesuffix("_table"))))
                   for table, kind in table_kinds(config).items() if kind in RAW_ID_KINDS}
    train_split, test_split = dien.load_split(data_dir, "train", encoding), dien.load_split(data_dir, "test", encoding)
    return Data(data_dir, vocabs.sizes, train_split, test_split, raw_ids, encoding.sizes)


class _Item(NamedTuple):
    """One global batch as this process sees it."""

    batch: Batch    # this process's contiguous share of the global batch (numpy)
    pack_size: int  # the packed history size of every batch shard (0: not packed)
    examples: int   # real examples in the whole global batch


def _items(split: dien.EncodedSplit, plan: batches_lib.Plan, local: Iterator[Batch], trainer: Trainer,
           batch_size: int) -> Iterator[_Item]:
    """This process's batches of `plan`, each with what every process must agree on for it."""
    for batch, (indices, width) in zip(local, plan):
        yield _Item(batch, trainer.pack_size(mapped.take(split.hist_lengths, indices), batch_size, width), len(indices))


def evaluate(trainer: Trainer, state: TrainState, split: dien.EncodedSplit,
             config: ml_collections.ConfigDict) -> dict[str, float]:
    """Every metric over the whole split, each example exactly once; every process gets the same numbers.

    Each process evaluates its share of every eval batch; probabilities, labels, users and weights
    of the whole batch are then gathered to every process in the single-process row order.
    """
    boundaries = tuple(config.bucket_boundaries)
    plan = batches_lib.eval_plan(split, config.eval_batch_size, config.max_seq_length, boundaries)
    local = functools.partial(batches_lib.eval_batches, split, config.eval_batch_size, config.max_seq_length,
                              keep=config.history_keep, shard_index=jax.process_index(),
                              shard_count=jax.process_count(), plan=plan)
    capacities = trainer.plan_capacities(local())
    metrics = StreamingMetrics()
    host_memory.release_free_memory()  # what training freed, before evaluation's batches and scratch
    for item in _items(split, plan, local(), trainer, config.eval_batch_size):
        batch = trainer.with_capacities(item.batch, capacities)  # owned tables' exchange reads them too
        batch = trainer.host.map_batch(batch, 0, train=False) if trainer.host.active else batch
        device_batch = trainer.device_batch(trainer.prepare(batch, item.pack_size))
        columns = parallel.gather({"prob": trainer.jit_eval_step(state, device_batch),
                                   **{k: device_batch[k] for k in ("label", "user", "weight")}})
        metrics.update(columns["label"], columns["prob"], columns["user"], columns["weight"])
    host_memory.release_free_memory()
    return metrics.compute()


def _train_items(split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Trainer,
                 start_step: int, whole: bool = False) -> Iterator[_Item]:
    """Endless train batches (this process's share of each, or `whole` global batches), epoch after epoch,
    from global step `start_step`."""
    boundaries = tuple(config.bucket_boundaries)
    per_epoch = batches_lib.num_train_batches(split, config.batch_size, config.max_seq_length, boundaries)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        plan = batches_lib.train_plan(split, config.batch_size, config.max_seq_length, seed=config.seed, epoch=epoch,
                                      boundaries=boundaries)
        local = functools.partial(batches_lib.train_batches, split, config.batch_size, config.max_seq_length,
                                  seed=config.seed, epoch=epoch, keep=config.history_keep,
                                  shard_index=0 if whole else jax.process_index(),
                                  shard_count=1 if whole else jax.process_count(), plan=plan)
        capacities = trainer.plan_capacities(local())  # routed tables: the whole epoch's, so one compiled shape
        for item in _items(split, plan[skip:], local(start_batch=skip), trainer, config.batch_size):
            yield item._replace(batch=trainer.with_capacities(item.batch, capacities)) if capacities else item
        epoch, skip = epoch + 1, 0


def _pack_floor(split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Trainer) -> int:
    """The packed history size that fits every batch shard of the first epoch (one compiled train shape).

    The lengths are read once in order into a copy clipped to the width (1 byte a sample), not at random batch by
    batch: on a memory-mapped every-event split that would leave the whole column resident (input_pipeline.mapped).
    """
    plan = batches_lib.train_plan(split, config.batch_size, config.max_seq_length, seed=config.seed, epoch=0,
                                  boundaries=tuple(config.bucket_boundaries))
    widest = config.max_seq_length
    dtype = np.uint8 if widest <= np.iinfo(np.uint8).max else np.int32
    clipped = np.concatenate([np.zeros(0, dtype)] + [np.minimum(part, widest).astype(dtype)
                                                     for part in mapped.chunks(split.hist_lengths)])
    return max((trainer.pack_size(clipped[indices], config.batch_size, width) for indices, width in plan), default=0)


class _PlanSource:
    """Each step's input from the epoch plans: this process's fixed share of every global batch (deterministic)."""

    finished = False  # the loop's step count ends the run

    def __init__(self, split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Trainer,
                 first_step: int):
        # Embedding kinds with state (din_jax.host_embeddings) map ids on this thread, step by step: replicated
        # mappings from the whole global batch (so every process's mapping stays the same), then the batch is cut;
        # owned ones (din_jax.owned_ids) from this process's share, through the ids' owners. Then it is packed.
        self._trainer, self._step = trainer, first_step
        self._map = trainer.host.active
        self._ahead: tuple[_Item, Batch, Any] | None = None  # owned tables: the next batch, its ids already sent
        self._whole = trainer.host.stateful or bool(config.incremental_ckpt)
        items = _train_items(split, config, trainer, first_step, whole=self._whole)
        prepare = ((lambda item: item.batch) if self._map  # noqa: E731
                   else (lambda item: trainer.prepare(item.batch, item.pack_size, train=True)))
        self._batches: Iterator[tuple[_Item, Batch]] = (
            Prefetcher(items, prepare, config.prefetch_depth, transfer=not self._map) if config.smartstaged
            else ((item, prepare(item)) for item in items))

    def _fetch(self) -> tuple[_Item, Batch, Any]:
        """The next batch, its ids sent to their owners already when tables map them there (HostEmbeddings.request)."""
        item, prepared = next(self._batches)
        return item, prepared, self._trainer.host.request(prepared) if self._map else None

    def next(self) -> tuple[int, Batch]:
        """(examples in the whole global batch, this process's prepared share).

        With owned tables (din_jax.owned_ids) the next batch's ids go to their owners before this one is mapped, so
        that exchange runs ahead of this step's train step and the owners' mapping of the next batch waits for
        nothing but it: the host maps while the device trains."""
        item, prepared, requests = self._ahead or self._fetch()
        self._ahead = self._fetch() if self._trainer.host.owned else None
        if self._map:
            mapped = self._trainer.host.map_batch(prepared, self._step, train=True, requests=requests)
            prepared = self._trainer.prepare(self._trainer.local_share(mapped) if self._whole else mapped,
                                             item.pack_size, train=True)
        self._step += 1
        return item.examples, prepared

    def after_step(self, step_metrics: dict[str, jax.Array], examples: int) -> tuple[int, bool]:
        """(examples the step trained, whether it counted as a step)."""
        return examples, True

    def checkpoint_extra(self) -> dict[str, np.ndarray]:
        return {}  # the position is the step itself

    def close(self) -> None:
        if isinstance(self._batches, Prefetcher):
            self._batches.close()


class _WorkQueueSource:
    """Each step's input from the run's work queue (config.workqueue): units go to whichever process asks first.

    A checkpoint records the epoch and which of its units have been trained, so a resumed run hands
    out only the others.
    """

    def __init__(self, split: dien.EncodedSplit, config: ml_collections.ConfigDict, trainer: Trainer,
                 first_step: int, extra: dict[str, np.ndarray]):
        self._split, self._config, self._trainer, self._first_step = split, config, trainer, first_step
        self.finished = False
        self._feed = self._open(int(extra.get("workqueue_epoch", 0)), extra.get("workqueue_trained"))
        self._contribution = None

    def _open(self, epoch: int, trained: np.ndarray | None = None) -> WorkQueueFeed:
        # Queue names are unique within the run (its first step and the epoch): every process uses the same.
        return WorkQueueFeed(self._split, self._config, self._trainer, epoch=epoch, name=f"{self._first_step}/{epoch}",
                             done_units=trained, wait_seconds=self._config.workqueue_wait_ms / 1000)

    def next(self) -> tuple[int, Batch]:
        self._contribution, prepared = self._feed.next()
        return self._contribution.examples, prepared

    def after_step(self, step_metrics: dict[str, jax.Array], examples: int) -> tuple[int, bool]:
        """Reads the step's example count and done flags (waits for the step); opens the next epoch's queue."""
        examples = int(step_metrics["examples"])
        self._feed.record(self._contribution)
        if int(step_metrics["queue_done"]) == self._trainer.mesh.size:  # every process has finished the epoch
            if self._config.steps:
                self._feed.close()
                self._feed = self._open(self._feed.epoch + 1)
            else:
                self.finished = True
        return examples, examples > 0

    def checkpoint_extra(self) -> dict[str, np.ndarray]:
        """The epoch and its trained units (gathered from every process: all must call this at the same step)."""
        return {"workqueue_epoch": np.array(self._feed.epoch), "workqueue_trained": self._feed.trained_units()}

    def close(self) -> None:
        self._feed.close()


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


class DivergedError(Exception):
    """The training loss or the parameters became NaN or Inf; the message names the step and the checkpoint kept."""


@jax.jit
def _first_non_finite(first: jax.Array, loss: jax.Array, step: int) -> jax.Array:
    """`step` if `loss` is the run's first NaN or Inf loss (`first` == 0), else `first`: a device scalar updated
    each step without a host sync; the loop reads it only at log, eval and save steps and at the end."""
    return jnp.where((first == 0) & ~jnp.isfinite(loss), step, first)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether no floating-point leaf of `tree` holds a NaN or Inf."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)]))


def _check_finite(first_bad: jax.Array, state: TrainState | None, checkpointer: checkpoint_lib.Checkpointer) -> None:
    """DivergedError if a step so far had a NaN or Inf loss or, given `state` (before saving it), a parameter is NaN
    or Inf: then nothing is saved, and the latest checkpoint stays the last good one."""
    step = int(first_bad)
    what = f"the training loss was NaN or Inf at step {step}"
    if not step and state is not None and not bool(_all_finite((state.params, state.batch_stats))):
        step = int(state.step)
        what = f"the parameters became NaN or Inf by step {step}"
    if not step:
        return
    last = checkpointer.latest_step()
    if last is None:
        raise DivergedError(f"{what}; training stopped before any checkpoint was written, so there is nothing to "
                            "resume from - lower --config.learning_rate (or check the data) and rerun the same "
                            "command: it starts again from step 0 (--config.save_steps=N keeps checkpoints on the way)")
    raise DivergedError(f"{what}; training stopped and checkpoint {checkpointer.directory}/{last} (step {last}) is the "
                        "last good one - lower --config.learning_rate (or check the data), then rerun to resume from it")


def _local_shards(array: jax.Array, whole: bool) -> Any:
    """A device array on the host: the whole of a replicated one, else this process's shards in device order."""
    if whole:
        return np.asarray(array.addressable_data(0))
    return parallel.local_rows(array)


@jax.jit
def _row_l2_weights(table: jax.Array) -> jax.Array:
    """DeepRec's l2 eviction measure of every row, 0.5 * |row|^2 (computed where the table lives)."""
    return 0.5 * jnp.sum(jnp.square(table.astype(jnp.float32)), axis=1)


class _Saver:
    """Full checkpoints (after feature eviction, with the host-side state) and, between them, incremental ones.

    A full save first applies config.ev_elimination, then writes the train state with the work queue's and
    the embedding mappings' state; with config.incremental_ckpt, every that many seconds the rows written
    since the last save go to an increment on top of the latest full checkpoint (din_jax.incremental).
    """

    def __init__(self, config: ml_collections.ConfigDict, checkpointer: checkpoint_lib.Checkpointer,
                 trainer: Trainer, checkpoint_dir: str):
        self._checkpointer, self._host, self._mesh = checkpointer, trainer.host, trainer.mesh
        self._layout = np.array(list(trainer.table_layout().values()))  # saved with every full checkpoint
        self._increments = (incremental_lib.IncrementalCheckpointer(checkpoint_dir, config.incremental_ckpt)
                            if config.incremental_ckpt else None)
        self.base = checkpointer.latest_step()  # the full checkpoint increments build on
        self.last = self.base or 0               # the step of the last save of any kind

    def restore(self, state: TrainState, extra: dict[str, np.ndarray]) -> TrainState:
        """The embedding mappings from `extra` (and this process's devices' shards of owned tables' mappings), then
        the increments on top of the full checkpoint."""
        self._host.load_state_dict(extra)
        if self._host.owned:
            self._host.load_device_state_dicts(self._checkpointer.restore_per_device(self._mesh, extra))
        if self._increments is None or self.base is None:
            return state
        state, increment_extra, self.last = self._increments.restore(state, self.base)
        if increment_extra:
            self._host.load_state_dict(increment_extra)
        return state

    def full(self, step: int, state: TrainState, source: Any, force: bool = False) -> None:
        """A full checkpoint at `step` if it is a save step (or forced)."""
        if not self._checkpointer.is_save_step(step, force):
            return
        # What training freed goes back before the checkpoint's host copies are made, and theirs after.
        host_memory.release_free_memory()
        evicted = self._host.evict(step, lambda table: _local_shards(_row_l2_weights(state.params[table]),
                                                                     whole=table not in self._host.owned))
        if any(evicted.values()):
            logging.info("Feature eviction (%s) at step %d: %s rows freed", self._host.config.ev_elimination, step,
                         evicted)
        if self._checkpointer.save(step, state, force=force,
                                   extra={**source.checkpoint_extra(), **self._host.state_dict(),
                                          checkpoint_lib.TABLE_LAYOUT: self._layout},
                                   per_device=self._host.device_state_dicts(), mesh=self._mesh):
            self.base = self.last = step
            if self._increments is not None:
                self._increments.prune(step)
        host_memory.release_free_memory()

    def incremental(self, step: int, state: TrainState, source: Any) -> None:
        """An increment of the rows written since the last save, when config.incremental_ckpt seconds have passed."""
        if self._increments is None or step == self.last or not self._increments.due():
            return
        if self.base is None:  # increments need a full checkpoint to build on
            self.full(step, state, source, force=True)
            return
        touched = {table: mapping.touched_since(self.last) for table, mapping in self._host.mappings.items()}
        self._increments.save(step, self.base, state, touched, extra=self._host.state_dict())
        self.last = step


def _start_history(workdir: str, first_step: int) -> None:
    """WORKDIR/history.jsonl without records past `first_step` (left by a run killed after its last checkpoint)."""
    plots.drop_history(workdir, lambda record: record["step"] > first_step)


def _write_plots(workdir: str, trainer: Trainer, state: TrainState, data: Data,
                 config: ml_collections.ConfigDict) -> None:
    """WORKDIR/plots (process 0): learning curves, throughput, and the attention weights of the first test batch.

    Every process calls this and computes the weights alike: with tables split by rows, all of them take part
    in reading the rows the batch looks up (ids translated to the owner-major layout; XLA gathers on each
    table shard and sums; no device holds a table).
    """
    batch = next(batches_lib.eval_batches(data.test, config.eval_batch_size, config.max_seq_length,
                                          keep=config.history_keep))
    if trainer.host.active:
        batch = trainer.host.map_batch(batch, 0, train=False)
    batch = trainer.physical_ids(batch)
    # The tables' rows as the state holds them: split tables carry zero rows up to a multiple of the devices.
    model = trainer.model.clone(vocab_sizes={**trainer.model.vocab_sizes, **{
        name.removesuffix("_table"): state.params[name].shape[0] for name in TABLES}})
    attention = jax.jit(lambda variables, batch: model.apply(variables, batch)[1],
                        out_shardings=parallel.replicated(trainer.mesh))
    weights = attention({"params": state.params, "batch_stats": state.batch_stats}, batch)  # [B, T], every device
    if parallel.is_primary():
        paths = plots.write_run_plots(workdir, plots.read_history(workdir), np.asarray(weights.addressable_data(0)),
                                      batch["hist_mask"])
        logging.info("Wrote %d plots to %s", len(paths), os.path.join(workdir, "plots"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains for `config.steps` steps (0 = one epoch), evaluates, writes metrics and checkpoints.

    In a multi-process run (din_jax.parallel) every process calls this with the same arguments:
    each reads its share of every batch, and process 0 alone writes metrics and TensorBoard logs.
    Rerunning the same command resumes from the latest checkpoint and ends as an uninterrupted run (the
    input order is a function of the seed, the epoch and the step). In a single-process run SIGINT or
    SIGTERM saves a checkpoint of the step reached and raises checkpoint_lib.Interrupted; a NaN or Inf
    loss raises DivergedError without saving.
    """
    mesh = parallel.data_mesh()
    config_check.validate(config, num_shards=mesh.size)
    primary = parallel.is_primary()
    checkpoint_dir = config.checkpoint_dir or os.path.join(workdir, "checkpoints")
    checkpoint_lib.require_writable(workdir, "--workdir")  # checked before the data: fail in seconds, not minutes
    checkpoint_lib.require_writable(checkpoint_dir, "--config.checkpoint_dir", keep=False)
    wall_start = time.perf_counter()
    data = parallel.primary_first("load_data", lambda: load_data(config, workdir))
    host_memory.release_free_memory()  # what loading freed, before the state takes its place
    trainer = create_trainer(config, data.vocab_sizes, mesh, data.raw_ids, data.id_sizes)
    state = trainer.init_state(config)
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, config.save_steps, config.keep_checkpoint_max)
    run_file = os.path.join(workdir, "config.json")
    restored = checkpointer.restore_latest_with_extra(state, checkpoint_lib.config_changes(run_file, config.to_dict()),
                                                      trainer.table_layout())
    extra: dict[str, np.ndarray] = {}
    saver = _Saver(config, checkpointer, trainer, checkpoint_dir)
    if restored is not None:
        state, extra = restored
        state = saver.restore(state, extra)
        logging.info("Resumed from checkpoint at step %d", int(state.step))
    if primary:  # once the checkpoint fits: what export and predict need to rebuild this model (config, vocabularies)
        jsonfile.write(run_file, {"config": config.to_dict(), "data_dir": data.data_dir})

    steps_per_epoch = batches_lib.num_train_batches(data.train, config.batch_size, config.max_seq_length,
                                                    tuple(config.bucket_boundaries))
    first_step = int(state.step)
    if trainer.pack_granularity and not config.workqueue:
        trainer = dataclasses.replace(trainer, pack_floor=_pack_floor(data.train, config, trainer))
    source = (_WorkQueueSource(data.train, config, trainer, first_step, extra) if config.workqueue
              else _PlanSource(data.train, config, trainer, first_step))
    total_steps = config.steps or (math.inf if config.workqueue else steps_per_epoch)
    # purge_step: TensorBoard hides what an interrupted run logged past the checkpoint this run resumes from.
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=first_step or None) if primary else None
    profiler = _Profiler(config.timeline if primary else 0, os.path.join(workdir, "profile"), first_step)
    logging.info("Data %s: %d train / %d test examples, vocabularies %s; %s of batch %d (%d steps per epoch) on "
                 "%d process(es), %d device(s)%s", data.data_dir, len(data.train), len(data.test), data.vocab_sizes,
                 "one epoch" if math.isinf(total_steps) else f"{total_steps} steps", config.batch_size, steps_per_epoch,
                 jax.process_count(), mesh.size, ", work queue" if config.workqueue else "")

    compile_seconds, timed_samples, timed_seconds, loss = 0.0, 0, 0.0, None  # loss: at the last log step
    eval_seconds = 0.0  # periodic evaluations, kept out of the training throughput
    trained_examples = 0
    eval_metrics: dict[str, Any] = {}
    progress = progress_bar(steps_per_epoch if math.isinf(total_steps) else total_steps, initial=first_step,
                            disable=not (config.progress_bar and primary))
    first_bad = jnp.zeros([], jnp.int32)  # on the device: the first step whose loss was NaN or Inf (0: none)
    # SIGINT / SIGTERM: checkpoint and stop. Several processes would have to agree on the step: there they kill.
    stop = checkpoint_lib.StopSignals(enabled=jax.process_count() == 1)
    if primary:
        _start_history(workdir, first_step)
    timer = time.perf_counter()
    interval_start, interval_samples = timer, 0  # the throughput since the previous log point (history.jsonl)
    step = first_step
    try:
        while step < total_steps and not source.finished and stop.received is None:
            examples, prepared = source.next()
            profiler.before(step)
            state, step_metrics = trainer.train_step(state, prepared, prepared=True)
            first_bad = _first_non_finite(first_bad, step_metrics["loss"], step + 1)
            profiler.after(step, state.step)
            examples, advanced = source.after_step(step_metrics, examples)
            trained_examples += examples
            if step == first_step:  # the first step compiles: time it apart from throughput
                jax.block_until_ready(state.step)
                compile_seconds = time.perf_counter() - timer
                host_memory.release_free_memory()  # the compiler's and initialisation's
                timer = interval_start = time.perf_counter()
            else:
                timed_samples += examples
                interval_samples += examples
            if not advanced:
                continue  # an empty work-queue step changed nothing
            step += 1
            progress.update(1)
            last = step == total_steps or source.finished
            if step % config.log_every_steps == 0 or last:
                _check_finite(first_bad, None, checkpointer)
                loss = float(step_metrics["loss"])
                timed_seconds = time.perf_counter() - timer - eval_seconds
                rate = timed_samples / timed_seconds if timed_seconds > 0 else 0.0
                progress.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:,.0f}")
                if writer:
                    writer.add_scalar("train/loss", loss, step)
                    writer.add_scalar("train/samples_per_sec", rate, step)
                    now = time.perf_counter()
                    plots.append_history(workdir, {"step": step, "loss": loss, "samples_per_sec":
                                                   interval_samples / max(now - interval_start, 1e-9)})
                interval_start, interval_samples = time.perf_counter(), 0
            if not config.no_eval and config.eval_every_steps and step % config.eval_every_steps == 0 and not last:
                _check_finite(first_bad, None, checkpointer)
                started = time.perf_counter()
                _write_eval(writer, evaluate(trainer, trainer.readable(state), data.test, config), step, workdir)
                interval_start = time.perf_counter()  # evaluation time is not training throughput
                eval_seconds += interval_start - started
            if checkpointer.is_save_step(step):
                _check_finite(first_bad, state, checkpointer)
                saver.full(step, state, source)
            else:
                saver.incremental(step, state, source)
        jax.block_until_ready(state)
        timed_seconds = time.perf_counter() - timer - eval_seconds if step > first_step else 0.0
        progress.close()
        source.close()
        _check_finite(first_bad, state, checkpointer)
        saver.full(int(state.step), state, source, force=True)
    finally:  # also after an error: no input thread left running, the checkpoint manager and logs closed
        stop.restore()
        progress.close()
        source.close()
        checkpointer.close()
        if writer:
            writer.flush()
    if stop.received is not None:
        if writer:
            writer.close()
        raise stop.interrupted(int(state.step), checkpointer.directory)

    trained = int(state.step) > first_step  # else a rerun of a finished run: it only evaluates
    final = trainer.readable(state)
    if not config.no_eval:
        eval_metrics = evaluate(trainer, final, data.test, config)
        eval_metrics["step"] = int(state.step)
        if primary and not trained:  # the evaluation replaces the finished run's own: one record per step
            plots.drop_history(workdir, lambda record: "eval" in record and record["step"] == int(state.step))
        _write_eval(writer, eval_metrics, int(state.step), workdir)
        if primary:
            jsonfile.write(os.path.join(workdir, "eval_metrics.json"), eval_metrics)
    _write_plots(workdir, trainer, final, data, config)  # every process: the tables may be split over them
    if writer:
        writer.close()
    summary = {"steps": int(state.step), "steps_this_run": int(state.step) - first_step,
               "samples_per_sec": timed_samples / timed_seconds if timed_seconds > 0 else None,
               "wall_seconds": time.perf_counter() - wall_start, "compile_seconds": compile_seconds,
               "final_train_loss": loss, "processes": jax.process_count(), "devices": mesh.size,
               "trained_examples": trained_examples, "embeddings": trainer.host.stats(),
               "table_bytes": sum(int(state.params[table].nbytes) for table in TABLES)}  # tables only, not slots
    summary_file = os.path.join(workdir, "train_summary.json")
    if not trained:  # the training run's summary stays as it was; this run's report says it only evaluated
        summary = {**(_read_summary(summary_file) or summary), "evaluated_only": True,
                   "wall_seconds": summary["wall_seconds"]}
    if primary and (trained or not os.path.exists(summary_file)):
        jsonfile.write(summary_file, summary)
    return {"eval": eval_metrics, "train": summary}


def _read_summary(path: str) -> dict[str, Any] | None:
    """The train_summary.json a finished run wrote, or None if there is none (or it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _write_eval(writer: SummaryWriter | None, metrics: dict[str, Any], step: int, workdir: str) -> None:
    """Eval metrics to the log, and (process 0, which has the writer) to TensorBoard and history.jsonl."""
    if writer:
        plots.append_history(workdir, {"step": step, "eval": {k: v for k, v in metrics.items() if k != "step"}})
    for name, value in metrics.items():
        if writer and name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"eval/{name}", value, step)
    logging.info("eval at step %d: %s", step, {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
