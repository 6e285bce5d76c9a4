"""DeepRec's optimizers: optax GradientTransformations for dense tensors, row-wise rules for embedding rows.

Every optimizer clips each gradient tensor to norm 5 first (`tf.clip_by_norm` per tensor, as DeepRec's
DIN does before `apply_gradients`). Each rule exists twice, with the same math:
- `dense`: an optax GradientTransformation over a pytree (dense layers; and the embedding tables
  when `config.sparse_embeddings=False`, the O(vocabulary) reference path);
- `rows`: the update of the rows an embedding table touched in a step, with per-row optimizer slots
  gathered and scattered alongside (the row-sparse path; see `din_jax/embedding.py`).
The two give the same numbers for every row: for Adagrad and AdagradDecay an untouched row has gradient 0,
which moves neither weight nor accumulator (on the tables AdagradDecay's `dense` runs DeepRec's sparse
kernel on the rows whose gradient is not all zero, as TensorFlow does for DIN's tables, whose gradients are
IndexedSlices); for Adam the untouched rows are caught up in closed form when next touched or read
(`exact_adam_rows`, din_jax.adam_catchup). 'lazyadam' and 'adamasync' are lazy by design: an untouched
row's moments do not decay (TF's LazyAdam, DeepRec's AdamAsync).
"""

from __future__ import annotations

from typing import Callable, Collection, NamedTuple

import jax
import jax.numpy as jnp
import optax

from din_jax import adam_catchup
from din_jax.model import TABLES

OPTIMIZERS = ("adam", "lazyadam", "adamasync", "adagrad", "adagraddecay")
ADAGRAD_INITIAL_ACCUMULATOR = 0.1


def clip_by_norm_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """tf.clip_by_norm on every leaf: g * max_norm / max(||g||_2, max_norm)."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: clip_tensor(g, max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_tensor(g: jax.Array, max_norm: float, axis_name: str | None = None) -> jax.Array:
    """One tensor clipped to L2 norm `max_norm` (computed in fp32). With `axis_name`, `g` is this device's part of
    a tensor split over that axis (a routed table's rows): the norm is the whole tensor's (one scalar psum)."""
    squares = jnp.sum(jnp.square(g.astype(jnp.float32)))
    norm = jnp.sqrt(squares if axis_name is None else jax.lax.psum(squares, axis_name))
    return (g * (max_norm / jnp.maximum(norm, max_norm))).astype(g.dtype)


def _zeros32(tree):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), tree)


def _cast_like(update_tree, like_tree):
    return jax.tree.map(lambda u, p: u.astype(p.dtype), update_tree, like_tree)


# ------------------------------------------------------------------------------------------ Adam
class TFAdamState(NamedTuple):
    """Step count and first/second moments, one pair per parameter."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def tf_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """TF1 AdamOptimizer: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; w -= lr_t m / (sqrt(v) + eps),
    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t).

    Differs from optax.adam in where epsilon sits: TF1 adds it outside the bias correction
    (tensorflow/python/training/adam.py; Kingma & Ba, section 2, "efficient version").
    """

    def init_fn(params):
        return TFAdamState(jnp.zeros([], jnp.int32), _zeros32(params), _zeros32(params))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
        t = count.astype(jnp.float32)
        lr_t = learning_rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        steps = jax.tree.map(lambda m, v: -lr_t * m / (jnp.sqrt(v) + eps), mu, nu)
        return _cast_like(steps, updates), TFAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class AdamAsyncState(NamedTuple):
    """Moments and, per variable, its own beta powers (DeepRec keeps them as slots of each variable)."""

    beta1_power: optax.Updates
    beta2_power: optax.Updates
    mu: optax.Updates
    nu: optax.Updates


def adam_async(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """DeepRec AdamAsyncOptimizer on dense variables: TF1 Adam with per-variable beta powers.

    Each variable advances its own beta1_power / beta2_power when it is updated (DeepRec
    docs/docs_en/AdamAsync-Optimizer.md), so variables need not share a global step. For embedding
    tables the rows are updated lazily: see `adam_rows(lazy_beta_powers=True)`.
    """

    def init_fn(params):
        ones = lambda: jax.tree.map(lambda p: jnp.ones([], jnp.float32), params)  # noqa: E731
        # Two distinct trees: one buffer in two places cannot be donated to the jitted step.
        return AdamAsyncState(ones(), ones(), _zeros32(params), _zeros32(params))

    def update_fn(updates, state, params=None):
        del params
        p1 = jax.tree.map(lambda p: p * b1, state.beta1_power)
        p2 = jax.tree.map(lambda p: p * b2, state.beta2_power)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
        steps = jax.tree.map(lambda m, v, q1, q2: -learning_rate * jnp.sqrt(1 - q2) / (1 - q1) * m / (jnp.sqrt(v) + eps),
                             mu, nu, p1, p2)
        return _cast_like(steps, updates), AdamAsyncState(p1, p2, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------- Adagrad
def tf_adagrad(learning_rate: float, initial_accumulator_value: float = ADAGRAD_INITIAL_ACCUMULATOR
               ) -> optax.GradientTransformation:
    """TF1 AdagradOptimizer: acc += g^2; w -= lr g / sqrt(acc), with acc starting at 0.1."""

    def init_fn(params):
        return optax.ScaleByRssState(
            sum_of_squares=jax.tree.map(lambda p: jnp.full(p.shape, initial_accumulator_value, jnp.float32), params))

    def update_fn(updates, state, params=None):
        del params
        acc = jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), state.sum_of_squares, updates)
        steps = jax.tree.map(lambda a, g: -learning_rate * g.astype(jnp.float32) / jnp.sqrt(a), acc, updates)
        return _cast_like(steps, updates), optax.ScaleByRssState(sum_of_squares=acc)

    return optax.GradientTransformation(init_fn, update_fn)


class AdagradDecayState(NamedTuple):
    """Global step, and per parameter its decay power and accumulator.

    The power is a scalar for a dense variable (ApplyAdagradDecayOp keeps one counter per variable)
    and a [rows] vector for an embedding table (SparseApplyAdagradDecayOp keeps one per row).
    """

    count: jax.Array
    power: optax.Updates
    accumulator: optax.Updates


def _decay_and_accumulate(acc: jax.Array, power: jax.Array, g: jax.Array, global_step: jax.Array,
                          decay_step: int, decay_rate: float, baseline: float,
                          touched: jax.Array | bool = True) -> tuple[jax.Array, jax.Array]:
    """The accumulator half of DeepRec's AdagradDecay kernels (ApplyAdagradDecayOp and
    SparseApplyAdagradDecayOp, tensorflow/core/kernels/training_ali_ops.cc):

        if global_step / decay_step > power:   # integer division
            acc = max(acc * decay_rate, baseline); power += 1
        acc += g^2

    At most one decay per update, however many periods have passed since `power` last moved.
    `power` is a scalar (one per dense variable) or [N] (one per row of acc [N, ...]); rows that are
    not `touched` keep acc and power (the sparse kernel never visits them).
    """
    decay = touched & (global_step // decay_step > power)
    decay_acc = jnp.reshape(decay, decay.shape + (1,) * (acc.ndim - decay.ndim))
    acc = jnp.where(decay_acc, jnp.maximum(acc * decay_rate, baseline), acc) + jnp.square(g)
    return acc, power + decay.astype(power.dtype)


def adagrad_decay(learning_rate: float, decay_step: int = 100_000, decay_rate: float = 0.9,
                  initial_accumulator_value: float = ADAGRAD_INITIAL_ACCUMULATOR, tables: Collection[str] = ()
                  ) -> optax.GradientTransformation:
    """DeepRec AdagradDecayOptimizer (tensorflow/python/training/adagrad_decay.py) on whole tensors.

    gs = global_step + 1 (`_global_step_on_worker`: the step read before apply_gradients increments
    it); acc starts at initial_accumulator_value, which is also the decay floor (`accumulator_baseline`).
    Dense variables: ApplyAdagradDecayOp (training_ali_ops.cc), one power per variable (its slot's
    element 0): if gs // decay_step > power: acc = max(acc * decay_rate, baseline) over the whole
    tensor and power += 1; then acc += g^2; w -= lr g / sqrt(acc).
    Leaves under a top-level key in `tables` are embedding tables, updated as TensorFlow updates a
    table whose gradient is IndexedSlices: SparseApplyAdagradDecayOp on the rows whose gradient is not
    all zero, each row with its own power (see `adagrad_decay_rows`); the other rows stay as they are.
    """

    def is_table(path) -> bool:
        return bool(path) and getattr(path[0], "key", None) in tables

    def init_fn(params):
        acc = jax.tree.map(lambda p: jnp.full(p.shape, initial_accumulator_value, jnp.float32), params)
        power = jax.tree_util.tree_map_with_path(
            lambda path, p: jnp.zeros(p.shape[:1] if is_table(path) else [], jnp.int32), params)
        return AdagradDecayState(jnp.zeros([], jnp.int32), power, acc)

    def update_fn(updates, state, params=None):
        del params
        gs = state.count + 1
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        # A table's power is [rows]: its touched rows are those with a gradient.
        touched = jax.tree.map(lambda p, g: jnp.any(g != 0, axis=tuple(range(1, g.ndim))) if p.ndim else True,
                               state.power, grads)
        acc_power = jax.tree.map(
            lambda a, p, g, t: _decay_and_accumulate(a, p, g, gs, decay_step, decay_rate, initial_accumulator_value, t),
            state.accumulator, state.power, grads, touched)
        acc = jax.tree.map(lambda _, ap: ap[0], updates, acc_power)
        power = jax.tree.map(lambda _, ap: ap[1], updates, acc_power)
        steps = jax.tree.map(lambda a, g: -learning_rate * g / jnp.sqrt(a), acc, grads)
        return _cast_like(steps, updates), AdagradDecayState(gs, power, acc)

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------ row-wise rules
class RowRule(NamedTuple):
    """How one embedding table's touched rows are updated.

    init(table) -> (row_slots, table_slots): row_slots are arrays with the table's leading dimension
    (gathered and scattered with the rows), table_slots are per-table scalars.
    update(rows [N, E], grads [N, E], row_slots (gathered), table_slots, step) ->
    (new rows, new row_slots, new table_slots); `step` is the global step before this update.
    """

    init: Callable[[jax.Array], tuple[dict[str, jax.Array], dict[str, jax.Array]]]
    update: Callable[..., tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]]
    # catch_up(table, row_slots, step) -> (table, row_slots): every row brought up to date through `step`, for
    # rules whose untouched rows change (exact Adam); None where an untouched row keeps its values.
    catch_up: Callable[..., tuple[jax.Array, dict[str, jax.Array]]] | None = None


def exact_adam_rows(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> RowRule:
    """TF1 AdamOptimizer on a table as on a dense variable (`_apply_sparse_shared`: every row's m and v decay and
    every row moves, every step), at the cost of the touched rows.

    Each row keeps `last`, the step through which it is up to date. A touched row is first caught up over the
    steps it missed (din_jax.adam_catchup: the closed form of Adam with gradient 0), then updated as tf_adam;
    `catch_up` brings every row up to date before anything reads the table.
    """

    def init(table):
        return {"m": jnp.zeros(table.shape, jnp.float32), "v": jnp.zeros(table.shape, jnp.float32),
                "last": jnp.zeros(table.shape[:1], jnp.int32)}, {}

    def caught_up(rows, slots, step):
        return adam_catchup.catch_up(rows, slots["m"], slots["v"], slots["last"], step, lr=learning_rate, b1=b1,
                                     b2=b2, eps=eps)

    def update(rows, grads, slots, table_slots, step):
        rows, m, v = caught_up(rows, slots, step)
        g = grads.astype(jnp.float32)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * jnp.square(g)
        lr_t = adam_catchup.learning_rates(learning_rate, b1, b2, step + 1)  # tf_adam's lr_t, as the catch-up's
        new_rows = (rows.astype(jnp.float32) - lr_t * m / (jnp.sqrt(v) + eps)).astype(rows.dtype)
        return new_rows, {"m": m, "v": v, "last": jnp.full_like(slots["last"], step + 1)}, table_slots

    def catch_up(table, slots, step):
        table, m, v = caught_up(table, slots, step)
        return table, {"m": m, "v": v, "last": jnp.full_like(slots["last"], step)}

    return RowRule(init, update, catch_up)


def adam_rows(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              lazy_beta_powers: bool = False) -> RowRule:
    """Lazy Adam on touched rows (TF LazyAdam, DeepRec AdamAsync): untouched rows' moments do not decay.

    Bias correction uses the global step (adam) or the table's own beta powers (adamasync); in DIN
    every table is updated every step, so both give lr_t of TF1 Adam.
    """

    def init(table):
        shape = table.shape
        table_slots = {"beta1_power": jnp.ones([], jnp.float32), "beta2_power": jnp.ones([], jnp.float32)} \
            if lazy_beta_powers else {}
        return {"m": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}, table_slots

    def update(rows, grads, slots, table_slots, step):
        g = grads.astype(jnp.float32)
        m = b1 * slots["m"] + (1 - b1) * g
        v = b2 * slots["v"] + (1 - b2) * jnp.square(g)
        if lazy_beta_powers:
            p1, p2 = table_slots["beta1_power"] * b1, table_slots["beta2_power"] * b2
            table_slots = {"beta1_power": p1, "beta2_power": p2}
        else:
            t = (step + 1).astype(jnp.float32)
            p1, p2 = b1**t, b2**t
        lr_t = learning_rate * jnp.sqrt(1 - p2) / (1 - p1)
        new_rows = (rows.astype(jnp.float32) - lr_t * m / (jnp.sqrt(v) + eps)).astype(rows.dtype)
        return new_rows, {"m": m, "v": v}, table_slots

    return RowRule(init, update)


def adagrad_rows(learning_rate: float) -> RowRule:
    """TF1 Adagrad on touched rows: acc_r += g_r^2; w_r -= lr g_r / sqrt(acc_r) (exact for every row)."""

    def init(table):
        return {"acc": jnp.full(table.shape, ADAGRAD_INITIAL_ACCUMULATOR, jnp.float32)}, {}

    def update(rows, grads, slots, table_slots, step):
        g = grads.astype(jnp.float32)
        acc = slots["acc"] + jnp.square(g)
        return (rows.astype(jnp.float32) - learning_rate * g / jnp.sqrt(acc)).astype(rows.dtype), {"acc": acc}, table_slots

    return RowRule(init, update)


def adagrad_decay_rows(learning_rate: float, decay_step: int = 100_000, decay_rate: float = 0.9,
                       initial_accumulator_value: float = ADAGRAD_INITIAL_ACCUMULATOR) -> RowRule:
    """DeepRec SparseApplyAdagradDecayOp (tensorflow/core/kernels/training_ali_ops.cc) on touched rows.

    Each row keeps its own decay power. A row touched at gs = step + 1 decays at most once:
    if gs // decay_step > power_r: acc_r = max(acc_r * decay_rate, baseline), power_r += 1; then
    acc_r += g_r^2 and w_r -= lr g_r / sqrt(acc_r). A row away for k decay periods thus catches up one
    decay per later touch, not k at once. baseline = initial_accumulator_value (0.1), which
    AdagradDecayOptimizer passes as `accumulator_baseline`.
    """

    def init(table):
        return {"acc": jnp.full(table.shape, initial_accumulator_value, jnp.float32),
                "power": jnp.zeros(table.shape[:1], jnp.int32)}, {}

    def update(rows, grads, slots, table_slots, step):
        g = grads.astype(jnp.float32)
        acc, power = _decay_and_accumulate(slots["acc"], slots["power"], g, step + 1, decay_step, decay_rate,
                                           initial_accumulator_value)
        new_rows = (rows.astype(jnp.float32) - learning_rate * g / jnp.sqrt(acc)).astype(rows.dtype)
        return new_rows, {"acc": acc, "power": power}, table_slots

    return RowRule(init, update)


class Optimizer(NamedTuple):
    """A configured optimizer: `dense` for dense tensors (clip included), `rows[table]` for each table's rows."""

    dense: optax.GradientTransformation
    rows: dict[str, RowRule]
    clip_norm: float

    @property
    def catches_up(self) -> bool:
        """Whether some table's untouched rows change (exact Adam): they must be caught up before being read."""
        return any(rule.catch_up is not None for rule in self.rows.values())


def create_optimizer(name: str, learning_rate: float, clip_norm: float = 5.0, *, decay_step: int = 100_000,
                     decay_rate: float = 0.9, lazy_tables: Collection[str] = ()) -> Optimizer:
    """The seed's --optimizer choice with DeepRec's per-tensor clipping in front of the dense rule.

    'adam' is TF1 Adam on every variable, the tables included (exact_adam_rows), except the tables in
    `lazy_tables` (EmbeddingVariables: DeepRec's kernels for them are lazy), which get lazy Adam;
    'lazyadam' is TF's LazyAdam on every table (untouched rows keep their moments and values).
    """
    rules: dict[str, tuple[Callable[[], optax.GradientTransformation], Callable[[str], RowRule]]] = {
        "adam": (lambda: tf_adam(learning_rate),
                 lambda table: adam_rows(learning_rate) if table in lazy_tables else exact_adam_rows(learning_rate)),
        "lazyadam": (lambda: tf_adam(learning_rate), lambda table: adam_rows(learning_rate)),
        "adamasync": (lambda: adam_async(learning_rate),
                      lambda table: adam_rows(learning_rate, lazy_beta_powers=True)),
        "adagrad": (lambda: tf_adagrad(learning_rate), lambda table: adagrad_rows(learning_rate)),
        "adagraddecay": (lambda: adagrad_decay(learning_rate, decay_step, decay_rate, tables=TABLES),
                         lambda table: adagrad_decay_rows(learning_rate, decay_step, decay_rate)),
    }
    if name not in rules:
        raise ValueError(f"config.optimizer={name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    dense, rows = rules[name]
    return Optimizer(optax.chain(clip_by_norm_per_tensor(clip_norm), dense()), {t: rows(t) for t in TABLES}, clip_norm)

