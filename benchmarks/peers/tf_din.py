"""DeepRec's DIN in TensorFlow 2, layer for layer as din_jax.model.DIN, for the peer benchmarks.

A tf.Module of plain variables (named as din_jax's params) driven by one `tf.function` train step, as a
straightforward TF2 port of DeepRec's TF1 graph: tf.gather lookups (IndexedSlices gradients), each
gradient clipped with tf.clip_by_norm(g, 5) as DeepRec's train.py does, and TF1's own
tf.compat.v1.train.AdamOptimizer (epsilon outside the bias correction; its sparse path decays every
row's moments, so it is the dense rule). `jit_compile=True` compiles the step with XLA.

One difference from din_jax that DeepRec has too: tf.clip_by_norm on an IndexedSlices gradient takes
the norm of its values with repeated rows unsummed; din_jax (and the torch port) take the norm of the
table-sized gradient. They differ only when a table's gradient norm exceeds 5 (not seen with mean
losses at these batch sizes).
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Mapping

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ATTENTION_PADDING = -(2.0**32) + 1
BN_EPSILON = 1e-3
INPUT_KEYS = ("uid", "mid", "cat", "hist_mids", "hist_cats", "hist_mask", "label", "weight")


def set_threads(num_threads: int | None = None) -> None:
    """Intra-op threads = the machine's cores (or `num_threads`); call before any op runs."""
    tf.config.threading.set_intra_op_parallelism_threads(num_threads or os.cpu_count() or 1)


def _glorot(rng: tf.random.Generator, shape: tuple[int, int]) -> tf.Tensor:
    """glorot_uniform: U(-sqrt(6 / (fan_in + fan_out)), +...)."""
    limit = math.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(shape, -limit, limit)


def _truncated_normal(rng: tf.random.Generator, shape: tuple[int, int], stddev: float) -> tf.Tensor:
    """TF1 truncated_normal_initializer: N(0, stddev) redrawn outside 2 stddev."""
    return rng.truncated_normal(shape, stddev=stddev)


class TFDIN(tf.Module):
    """DIN with din_jax's sizes, initialisers, masking and frozen BN; variables keyed by din_jax param paths."""

    def __init__(self, vocab_sizes: Mapping[str, int], embedding_dim: int = 18,
                 attention_hidden: tuple[int, ...] = (80, 40), mlp_hidden: tuple[int, ...] = (200, 80),
                 mlp_out: int = 2, seed: int = 0):
        """Creates the variables from `seed`."""
        super().__init__(name="din")
        rng = tf.random.Generator.from_seed(seed)
        e, d = embedding_dim, 2 * embedding_dim
        self.vars: dict[str, tf.Variable] = {}

        def add(name, value):
            self.vars[name] = tf.Variable(value, name=name.replace("/", "_"))

        def dense(name, fan_in, fan_out):
            add(f"{name}/kernel", _glorot(rng, (fan_in, fan_out)))
            add(f"{name}/bias", tf.zeros([fan_out]))

        add("uid_table", _truncated_normal(rng, (vocab_sizes["uid"], e), e**-0.5))
        add("mid_table", _glorot(rng, (vocab_sizes["mid"], e)))
        add("cat_table", _glorot(rng, (vocab_sizes["cat"], e)))
        dense("attention_unit/query", d, d)
        add("attention_unit/query_prelu/alpha", tf.fill([d], 0.1))
        widths = (4 * d, *attention_hidden)
        self.attention_layers = [f"attention_unit/att_{i}" for i in range(len(attention_hidden))]
        for name, a, b in zip(self.attention_layers, widths, widths[1:]):
            dense(name, a, b)
        dense("attention_unit/att_out", widths[-1], 1)
        top = e + 4 * d  # 162
        add("bn/scale", tf.ones([top]))
        add("bn/bias", tf.zeros([top]))
        widths = (top, *mlp_hidden)
        self.hidden_layers = [f"hidden_layers_{i}" for i in range(len(mlp_hidden))]
        for name, a, b in zip(self.hidden_layers, widths, widths[1:]):
            dense(name, a, b)
        dense("pre_logit", widths[-1], mlp_out)
        dense("logit", mlp_out, 1)
        self.variable_list = list(self.vars.values())

    def _dense(self, name: str, x: tf.Tensor) -> tf.Tensor:
        kernel, bias = self.vars[f"{name}/kernel"], self.vars[f"{name}/bias"]
        return (tf.matmul(x, kernel) if x.shape.rank == 2 else tf.tensordot(x, kernel, 1)) + bias

    def __call__(self, batch: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Logits [B]."""
        v = self.vars
        mask = batch["hist_mask"]                                                                 # [B, T]
        uid = tf.gather(v["uid_table"], batch["uid"])                                             # [B, E]
        item = tf.concat([tf.gather(v["mid_table"], batch["mid"]), tf.gather(v["cat_table"], batch["cat"])], -1)
        history = tf.concat([tf.gather(v["mid_table"], batch["hist_mids"]),
                             tf.gather(v["cat_table"], batch["hist_cats"])], -1)
        history = history * tf.cast(mask, tf.float32)[..., None]                                  # [B, T, D]
        history_sum = tf.reduce_sum(history, 1)                                                   # [B, D]
        query = self._dense("attention_unit/query", item)
        alpha = v["attention_unit/query_prelu/alpha"]
        query = tf.maximum(0.0, query) + alpha * tf.minimum(0.0, query)
        query = tf.broadcast_to(query[:, None, :], tf.shape(history))                             # [B, T, D]
        x = tf.concat([query, history, query - history, query * history], -1)                     # [B, T, 4D]
        for name in self.attention_layers:
            x = tf.sigmoid(self._dense(name, x))
        scores = self._dense("attention_unit/att_out", x)[..., 0]                                 # [B, T]
        weights = tf.nn.softmax(tf.where(mask, scores, ATTENTION_PADDING * tf.ones_like(scores)), -1)
        attended = tf.einsum("bt,btd->bd", weights, history)                                      # [B, D]
        x = tf.concat([uid, item, history_sum, item * history_sum, attended], -1)                 # [B, 162]
        x = x * (v["bn/scale"] / math.sqrt(1.0 + BN_EPSILON)) + v["bn/bias"]
        for name in self.hidden_layers:
            x = tf.nn.relu(self._dense(name, x))
        return self._dense("logit", self._dense("pre_logit", x))[:, 0]


def weighted_sigmoid_cross_entropy(logits: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Mean sigmoid cross-entropy over the weight-1 rows (din_jax.steps.weighted_sigmoid_cross_entropy)."""
    losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


class Trainer:
    """A TFDIN with TF1 Adam and per-tensor clipping: `train_step` on numpy batches, `predict` probabilities."""

    def __init__(self, vocab_sizes: Mapping[str, int], learning_rate: float = 1e-3, clip_norm: float = 5.0,
                 seed: int = 0, jit_compile: bool = False):
        """Builds the model from `seed` and the tf.functions (XLA-compiled with `jit_compile`)."""
        self.model = TFDIN(vocab_sizes, seed=seed)
        self.optimizer = tf.compat.v1.train.AdamOptimizer(learning_rate, beta1=0.9, beta2=0.999, epsilon=1e-8)
        self.clip_norm = clip_norm
        self._train_step = tf.function(self._step, jit_compile=jit_compile)
        self._predict = tf.function(lambda batch: tf.sigmoid(self.model(batch)), jit_compile=jit_compile)

    def _step(self, batch: Mapping[str, tf.Tensor]) -> tf.Tensor:
        variables = self.model.variable_list
        with tf.GradientTape() as tape:
            loss = weighted_sigmoid_cross_entropy(self.model(batch), batch["label"], batch["weight"])
        grads = tape.gradient(loss, variables)
        clipped = [tf.clip_by_norm(g, self.clip_norm) for g in grads]
        self.optimizer.apply_gradients(zip(clipped, variables))
        return loss

    def train_step(self, batch: Mapping[str, np.ndarray]) -> float:
        """One optimizer step on a numpy batch; returns the batch loss."""
        return float(self._train_step(_inputs(batch)))

    def train(self, batches: Iterable[Mapping[str, np.ndarray]], steps: int) -> float:
        """`steps` train steps on the next batches of `batches`; returns the last loss."""
        loss = float("nan")
        for _, batch in zip(range(steps), batches):
            loss = self.train_step(batch)
        return loss

    def predict(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Click probabilities [B] as float32 numpy."""
        return self._predict(_inputs(batch)).numpy()


def _inputs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The keys the model reads (numpy arrays become tensors at the tf.function boundary)."""
    return {key: batch[key] for key in INPUT_KEYS}


def load_flax_params(model: TFDIN, params: Mapping) -> None:
    """Copies a din_jax DIN param tree (default sizes, frozen BN, relu, softmax attention) into `model`."""
    for path, variable in model.vars.items():
        node = params
        for key in path.split("/"):
            node = node[key]
        variable.assign(np.asarray(node))
