"""DIN exactly as DeepRec's modelzoo builds it: embeddings, the attention unit, and the top MLP.

Shapes: B = batch, T = history length, E = embedding_dim (18), D = 2E (item ++ category = 36).
The model is split into `embed` (table lookups) and `from_embedded` (everything after the lookups)
so that training can take gradients with respect to gathered rows instead of whole tables. The
history is handled as a list of P positions with the example each belongs to (segment ids), so a
batch can carry only its real history positions (packing) instead of B x T padded ones; an unpacked
batch's positions are the [B, T] grid, and its per-example operations are reshapes (see History).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# tf.layers.batch_normalization defaults.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99

ATTENTION_MODES = ("softmax", "unnormalized", "mean", "none")

# Table parameter name -> the batch columns that look it up.
TABLES: dict[str, tuple[str, ...]] = {"uid_table": ("uid",), "mid_table": ("mid", "hist_mids"),
                                      "cat_table": ("cat", "hist_cats")}
SECOND_ROW = "_r"     # column suffix: a multi-hash lookup's second row (its remainder table's row)
BLOCKS = "_blocks"    # column suffix: a dynamic-dimension lookup's live dimension blocks


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """How a table's rows make each lookup's embedding (din_jax.ev maps ids to rows on the host).

    One row per lookup (dense vocabulary, EmbeddingVariable, adaptive), two rows combined by `combiner`
    (multi-hash: 'add', 'mul', or 'concat' of two half-width rows; column '<name>_r' holds the second), or
    one row of which only the first `<name>_blocks` blocks of `block_size` dimensions are live (dynamic
    dimension). Rows past the table's end (the host's 'no row') read zeros.
    """

    rows: int
    width: int
    combiner: str = ""
    block_size: int = 0

    def combine(self, first: Array, second: Array | None = None, blocks: Array | None = None) -> Array:
        """The embeddings [L, E] of L lookups from their rows (and second rows / live blocks)."""
        if self.combiner == "add":
            first = first + second
        elif self.combiner == "mul":
            first = first * second
        elif self.combiner == "concat":
            first = jnp.concatenate([first, second], axis=-1)
        if self.block_size:
            live = jnp.arange(first.shape[-1]) // self.block_size < blocks[:, None]
            first = jnp.where(live, first, 0)
        return first


def lookup_columns(table: str, spec: TableSpec | None = None) -> tuple[str, ...]:
    """The batch columns whose values are rows of `table`: its id columns, then their second rows."""
    columns = TABLES[table]
    if spec is not None and spec.combiner:
        columns = columns + tuple(c + SECOND_ROW for c in columns)
    return columns

glorot_uniform = nn.initializers.glorot_uniform()


def table_glorot_uniform(rows: int, width: int):
    """glorot_uniform of a [rows, width] table, bit for bit, whatever shape it is asked for (owner_major asks for
    [Q, N, width]): the scale comes from the table's shape, the values from the flat index (threefry is
    partitionable, so an array's random values depend on each element's flat index only)."""
    variance = 1.0 / max(1.0, (rows + width) / 2.0)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -1) * jnp.sqrt(3 * jnp.array(variance, dtype)).astype(dtype)

    return init


def owner_major(init, rows: int, shards: int):
    """An initialiser of a table split over `shards` devices in the owner-major layout (sharded_tables.to_physical):
    the same values as init(key, [rows, D]) reordered, generated as [Q, N, D] and transposed, so under a sharded
    jit each device computes only its own rows (no device builds the whole table); rows past `rows` are zero."""
    q = -(-rows // shards)

    def create(key, shape, dtype=jnp.float32):
        width = shape[1]
        grid = init(key, (q, shards, width), dtype)  # element [l, o] is logical row l * N + o
        real = (jnp.arange(q)[:, None] * shards + jnp.arange(shards)[None, :] < rows)[..., None]
        return jnp.where(real, grid, 0).transpose(1, 0, 2).reshape(shards * q, width)

    return create


def tf1_truncated_normal(stddev: float):
    """TF1 `truncated_normal_initializer`: N(0, stddev) redrawn outside 2 stddev (no variance correction)."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * stddev).astype(dtype)

    return init


class PReLU(nn.Module):
    """DeepRec's prelu: max(0, x) + alpha * min(0, x), one alpha per channel initialised to 0.1."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        alpha = self.param("alpha", nn.initializers.constant(0.1), (x.shape[-1],), self.param_dtype)
        return jnp.maximum(0.0, x) + alpha.astype(x.dtype) * jnp.minimum(0.0, x)


class Dice(nn.Module):
    """DIN paper's Dice (DIEN code): p = sigmoid(batch-normalised x); alpha * (1 - p) * x + p * x.

    Statistics are over the real rows of the batch (`row_weight` > 0), in training and evaluation
    alike, as the DIEN code does; alpha starts at 0.
    """

    epsilon: float = 1e-9
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, row_weight: Array) -> Array:
        alpha = self.param("alpha", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        w = row_weight.astype(jnp.float32)[:, None]
        count = jnp.maximum(w.sum(), 1.0)
        x32 = x.astype(jnp.float32)
        mean = (x32 * w).sum(0) / count
        std = jnp.sqrt(((jnp.square(x32 - mean) + self.epsilon) * w).sum(0) / count)
        p = jax.nn.sigmoid((x32 - mean) / (std + self.epsilon)).astype(x.dtype)
        return alpha.astype(x.dtype) * (1.0 - p) * x + p * x


class FrozenBatchNorm(nn.Module):
    """DeepRec's BN quirk: tf.layers.batch_normalization without training=True.

    It always normalises with its initial moving statistics (mean 0, variance 1), so the layer is
    y = gamma * x / sqrt(1 + eps) + beta, and only gamma and beta learn.
    """

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gamma = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        beta = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return x * (gamma / jnp.sqrt(1.0 + BN_EPSILON)).astype(x.dtype) + beta.astype(x.dtype)


def segment_sum(values: Array, segment: Array, num_segments: int) -> Array:
    """Sums of `values` rows per segment id in [0, num_segments); ids >= num_segments (padding) are dropped."""
    return jax.ops.segment_sum(values, segment, num_segments + 1)[:num_segments]


@dataclasses.dataclass(frozen=True)
class History:
    """Which example each of the P history positions belongs to, and the per-example operations over them.

    Packed (seq_len 0): positions in any order, `segment` [P] the example id (B for padding), so sums and
    softmaxes are segment operations. Grid (seq_len T): the P = B * T positions of the padded [B, T] history
    in row-major order, so the same operations are reshapes, broadcasts and reductions over T, which cost
    less than segment operations where nearly every position is real (long histories).
    """

    segment: Array     # [P]; B on masked and padding positions
    batch_size: int
    seq_len: int = 0   # T when the positions are the [B, T] grid, else 0 (packed)

    @property
    def real(self) -> Array:
        """[P] bool: the position holds a history entry."""
        return self.segment < self.batch_size

    def sum(self, values: Array) -> Array:
        """Per-example sums [B, ...] of per-position `values` [P, ...] (padding positions must hold 0)."""
        if self.seq_len:
            return values.reshape(self.batch_size, self.seq_len, *values.shape[1:]).sum(1)
        return segment_sum(values, self.segment, self.batch_size)

    def expand(self, per_example: Array) -> Array:
        """Per-example values [B, ...] at every position [P, ...] (padding positions get some example's)."""
        if self.seq_len:
            shape = (self.batch_size, self.seq_len, *per_example.shape[1:])
            return jnp.broadcast_to(per_example[:, None], shape).reshape(-1, *per_example.shape[1:])
        return per_example[jnp.minimum(self.segment, self.batch_size - 1)]

    def softmax(self, scores: Array) -> Array:
        """Per-example softmax [P] of `scores` [P] over the real positions; 0 on the others."""
        masked = jnp.where(self.real, scores, -jnp.inf)
        if self.seq_len:  # the max shift only keeps exp in range
            top = masked.reshape(self.batch_size, self.seq_len).max(1)
        else:
            top = jax.ops.segment_max(masked, self.segment, self.batch_size + 1)[:self.batch_size]
        shifted = jnp.where(self.real, scores - self.expand(jax.lax.stop_gradient(top)), 0.0)
        exp = jnp.where(self.real, jnp.exp(shifted), 0.0)
        return exp / jnp.maximum(self.expand(self.sum(exp)), 1e-30)


def history_of(embedded: Mapping[str, Array], batch_size: int) -> History:
    """The History of DIN.from_embedded's inputs: grid when they carry the [B, T] 'hist_mask', else packed."""
    grid = embedded.get("hist_mask")
    return History(embedded["segment"], batch_size, 0 if grid is None else grid.shape[1])


class SplitConcatDense(nn.Module):
    """Dense(H) over [q, k, q-k, q*k] computed without building the 4D-wide input.

    With the kernel in four row blocks W = [Wq; Wk; Wd; Wp]:
    [q, k, q-k, q*k] @ W + b = (q @ (Wq + Wd) + b) + [k, q*k] @ [Wk - Wd; Wp],
    so the query's share is computed once per example instead of once per history position, and the
    per-position share is one [P, 2D] x [2D, H] matmul. The parameters are those of nn.Dense(H) on the
    4D-wide input (same shapes, same init).
    """

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: Array, keys: Array, history: History) -> Array:
        d = keys.shape[-1]
        kernel = self.param("kernel", glorot_uniform, (4 * d, self.features), self.param_dtype).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        w_q, w_k, w_d, w_p = kernel[:d], kernel[d:2 * d], kernel[2 * d:3 * d], kernel[3 * d:]
        per_example = query @ (w_q + w_d) + bias                                                    # [B, H]
        per_position = jnp.concatenate([keys, history.expand(query) * keys], axis=-1)               # [P, 2D]
        return history.expand(per_example) + per_position @ jnp.concatenate([w_k - w_d, w_p])      # [P, H]


class AttentionUnit(nn.Module):
    """DIN's local activation unit over the history: weights = softmax(MLP([q, k, q-k, q*k])) on real positions.

    The history comes as P positions, keys [P, D], laid out as `history` says. query = PReLU(Dense_D(item_emb));
    the softmax runs over each example's real positions, which is what DeepRec's -2^32+1 fill of padded scores
    amounts to (their exp is 0; an empty history, whose padded keys DeepRec zeroes, gives output 0 either way).
    Mode 'unnormalized' (the DIN paper) uses the raw scores; mode 'mean' is uniform weights, no learned unit.
    Returns (output [B, D], weights [P]; 0 on padding).
    """

    hidden: tuple[int, ...] = (80, 40)
    mode: str = "softmax"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, item_emb: Array, keys: Array, history: History) -> tuple[Array, Array]:
        real = history.real
        if self.mode == "mean":
            counts = history.sum(real.astype(jnp.float32))
            weights = jnp.where(real, 1.0 / history.expand(jnp.maximum(counts, 1.0)), 0.0)
        else:
            dense = lambda n, name: nn.Dense(n, kernel_init=glorot_uniform, dtype=self.dtype,  # noqa: E731
                                             param_dtype=self.param_dtype, name=name)
            query = PReLU(param_dtype=self.param_dtype, name="query_prelu")(dense(keys.shape[-1], "query")(item_emb))
            x = nn.sigmoid(SplitConcatDense(self.hidden[0], self.dtype, self.param_dtype, name="att_0")(
                query, keys, history))
            for i, width in enumerate(self.hidden[1:], start=1):
                x = nn.sigmoid(dense(width, f"att_{i}")(x))
            scores = dense(1, "att_out")(x)[:, 0].astype(jnp.float32)                              # [P]
            if self.mode == "softmax":
                weights = history.softmax(scores)
            else:
                weights = jnp.where(real, scores, 0.0)
        output = history.sum(weights[:, None].astype(keys.dtype) * keys)                           # [B, D]
        return output, weights


class DIN(nn.Module):
    """Deep Interest Network with DeepRec's layer sizes, initialisers and BN behaviour.

    batch_norm: 'frozen' (DeepRec parity), 'batch' (batch statistics while training, moving averages
    in evaluation) or 'none'. activation: 'relu' (DeepRec) or 'dice' for the top MLP's hidden layers.
    attention: 'softmax' (DeepRec), 'unnormalized' (DIN paper), 'mean' (uniform weights instead of the
    attention unit) or 'none' (DIEN's BaseModel: concat(uid, item, sum of history) - plain sum pooling).
    Precision: `dtype` is the top MLP's compute dtype (DeepRec's --bf16 casts the top MLP's input to bf16 and
    keeps the embeddings and the attention unit in fp32); `table_dtype` stores the embedding tables (bf16 halves
    their memory and gather traffic; rows are widened to fp32 after the gather). Every other parameter is fp32.
    """

    vocab_sizes: Mapping[str, int]
    embedding_dim: int = 18
    attention_hidden: tuple[int, ...] = (80, 40)
    mlp_hidden: tuple[int, ...] = (200, 80)
    mlp_out: int = 2
    batch_norm: str = "frozen"
    activation: str = "relu"
    attention: str = "softmax"
    dtype: Any = jnp.float32
    table_dtype: Any = jnp.float32
    table_specs: tuple[tuple[str, TableSpec], ...] = ()  # (table name, spec) for tables that are not one row per id
    # (table name, devices): tables created straight in the owner-major layout of din_jax.sharded_tables, so that
    # each device generates only its own rows (the values are the whole table's, reordered); set for init only.
    table_shards: tuple[tuple[str, int], ...] = ()

    def setup(self):
        if self.batch_norm not in ("frozen", "batch", "none"):
            raise ValueError(f"model.batch_norm must be 'frozen', 'batch' or 'none', got {self.batch_norm!r}")
        if self.activation not in ("relu", "dice"):
            raise ValueError(f"model.activation must be 'relu' or 'dice', got {self.activation!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"model.attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        e = self.embedding_dim
        shards = dict(self.table_shards)

        def table(name: str, make_init):
            """The table's parameter; make_init(rows, width) gives its initialiser."""
            rows, width = self.vocab_sizes[name], self.spec(name).width or e
            init, split = make_init(rows, width), shards.get(f"{name}_table", 0)
            if split:
                init, rows = owner_major(init, rows, split), split * -(-rows // split)
            return self.param(f"{name}_table", init, (rows, width), self.table_dtype)

        self.uid_table = table("uid", lambda rows, width: tf1_truncated_normal(e**-0.5))
        self.mid_table = table("mid", table_glorot_uniform)
        self.cat_table = table("cat", table_glorot_uniform)
        self.attention_unit = AttentionUnit(self.attention_hidden, self.attention)
        if self.batch_norm == "frozen":
            self.bn = FrozenBatchNorm()
        elif self.batch_norm == "batch":
            self.bn = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype)
        dense = lambda n: nn.Dense(n, kernel_init=glorot_uniform, dtype=self.dtype)  # noqa: E731
        self.hidden_layers = [dense(n) for n in self.mlp_hidden]
        if self.activation == "dice":
            self.dice = [Dice() for _ in self.mlp_hidden]
        self.pre_logit = dense(self.mlp_out)
        self.logit = dense(1)

    def spec(self, name: str) -> TableSpec:
        """How table `name` ('uid', 'mid', 'cat') makes embeddings: table_specs' entry, else one row per id."""
        return dict(self.table_specs).get(f"{name}_table") or TableSpec(self.vocab_sizes[name], self.embedding_dim)

    def embed(self, batch: Mapping[str, Array]) -> dict[str, Array]:
        """Table lookups: uid [B, E], item [B, D], and the history as positions (see history_positions)."""
        flat, _ = history_positions(batch)
        tables = {"uid_table": self.uid_table, "mid_table": self.mid_table, "cat_table": self.cat_table}

        def lookup(table: str, column: str) -> Array:
            def per_lookup(name):  # a column's values per lookup; a missing one (initialisation) as `column`
                values = jnp.asarray(batch.get(name, batch[column]))
                if column.startswith("hist_"):
                    values = values.reshape(-1).at[flat].get(mode="fill", fill_value=0)
                return values

            spec = self.spec(table.removesuffix("_table"))
            rows = lambda name: tables[table].at[per_lookup(name)].get(mode="fill", fill_value=0)  # noqa: E731
            blocks = None
            if spec.block_size:  # without a blocks column (initialisation) every block is live
                blocks = (per_lookup(column + BLOCKS) if column + BLOCKS in batch
                          else jnp.full(per_lookup(column).shape, self.embedding_dim))
            # Rows past the table's end are the host's 'no row': they read zeros.
            return spec.combine(rows(column), rows(column + SECOND_ROW) if spec.combiner else None, blocks)

        item = jnp.concatenate([lookup("mid_table", "mid"), lookup("cat_table", "cat")], axis=-1)
        keys = jnp.concatenate([lookup("mid_table", "hist_mids"), lookup("cat_table", "hist_cats")], axis=-1)
        return {"uid": lookup("uid_table", "uid"), "item": item, "keys": keys, **history_layout(batch)}

    def from_embedded(self, embedded: Mapping[str, Array], row_weight: Array,
                      train: bool = False) -> tuple[Array, Array]:
        """Everything after the lookups: returns (logits [B] in fp32, attention weights [P])."""
        uid = embedded["uid"].astype(jnp.float32)
        item = embedded["item"].astype(jnp.float32)
        history = history_of(embedded, item.shape[0])
        keys = jnp.where(history.real[:, None], embedded["keys"].astype(jnp.float32), 0)        # [P, D]
        history_sum = history.sum(keys)                                                         # [B, D]
        if self.attention == "none":  # DIEN's BaseModel: plain sum pooling, no interaction terms
            weights = history.real.astype(jnp.float32)
            x = jnp.concatenate([uid, item, history_sum], axis=-1)                               # [B, 90]
        else:
            attended, weights = self.attention_unit(item, keys, history)
            x = jnp.concatenate([uid, item, history_sum, item * history_sum, attended], axis=-1)  # [B, 162]
        x = x.astype(self.dtype)  # the top MLP's input: where DeepRec's --bf16 casts
        if self.batch_norm == "frozen":
            x = self.bn(x)
        elif self.batch_norm == "batch":
            real_rows = jnp.broadcast_to((row_weight > 0)[:, None], x.shape)  # padding rows stay out of the statistics
            x = self.bn(x, use_running_average=not train, mask=real_rows)
        for i, layer in enumerate(self.hidden_layers):
            x = layer(x)
            x = self.dice[i](x, row_weight) if self.activation == "dice" else nn.relu(x)
        logits = self.logit(self.pre_logit(x))[:, 0]
        return logits.astype(jnp.float32), weights

    def __call__(self, batch: Mapping[str, Array], train: bool = False) -> tuple[Array, Array]:
        """Logits [B] and attention weights [B, T] for a batch of ids (see input_pipeline.batches)."""
        logits, weights = self.from_embedded(self.embed(batch), batch["weight"], train)
        flat, _ = history_positions(batch)
        batch_size, seq_len = batch["hist_mids"].shape
        grid = jnp.zeros([batch_size * seq_len], jnp.float32).at[flat].set(weights, mode="drop")
        return logits, grid.reshape(batch_size, seq_len)


def history_positions(batch: Mapping[str, Array]) -> tuple[Array, Array]:
    """The history positions a step computes on: flat indices into [B*T] and their example ids.

    A batch may carry 'hist_index' [P] (packed: only real positions, padded with B*T, see
    din_jax.packing); otherwise every one of the B*T positions is used and masked ones point past
    the end. Padding positions get example id B, which every segment operation drops. The ids are not sorted
    when positions are not packed (masked positions between real ones get B), so no segment operation may
    promise sorted indices (XLA on GPU relies on that promise).
    """
    batch_size, seq_len = batch["hist_mids"].shape
    if "hist_segment" in batch:  # packed on the host with its segments (din_jax.packing)
        return batch["hist_index"], batch["hist_segment"]
    if "hist_index" in batch:
        flat = batch["hist_index"]
    else:
        flat = jnp.where(batch["hist_mask"].reshape(-1), jnp.arange(batch_size * seq_len), batch_size * seq_len)
    return flat, jnp.minimum(flat // seq_len, batch_size)


def history_layout(batch: Mapping[str, Array]) -> dict[str, Array]:
    """How DIN.from_embedded finds each history position's example: 'segment' [P] (see history_positions), and for a
    batch that is not packed its 'hist_mask' [B, T], whose shape says the positions are the [B, T] grid."""
    layout = {"segment": history_positions(batch)[1]}
    if "hist_index" not in batch:
        layout["hist_mask"] = jnp.asarray(batch["hist_mask"])
    return layout
