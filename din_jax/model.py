"""DIN exactly as DeepRec's modelzoo builds it: embeddings, the attention unit, and the top MLP.

Shapes: B = batch, T = history length, E = embedding_dim (18), D = 2E (item ++ category = 36).
The model is split into `embed` (table lookups) and `from_embedded` (everything after the lookups)
so that training can take gradients with respect to gathered rows instead of whole tables.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# DeepRec fills masked attention scores with -2^32 + 1 before the softmax.
ATTENTION_PADDING = -(2.0**32) + 1
# tf.layers.batch_normalization defaults.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99

ATTENTION_MODES = ("softmax", "unnormalized", "mean", "none")

glorot_uniform = nn.initializers.glorot_uniform()


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


class AttentionUnit(nn.Module):
    """DIN's local activation unit over the history: weights = softmax(MLP([q, k, q-k, q*k])) on real positions.

    query = PReLU(Dense_D(item_emb)); scores at padded positions are set to -2^32+1 before the softmax
    (DeepRec). mode 'unnormalized' (the DIN paper) uses the raw scores, 0 on padded positions; mode
    'mean' is the no-attention baseline: uniform weights over the real history, no learned unit.
    Returns (output [B, D], weights [B, T]).
    """

    hidden: tuple[int, ...] = (80, 40)
    mode: str = "softmax"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, item_emb: Array, keys: Array, mask: Array) -> tuple[Array, Array]:
        if self.mode == "mean":
            weights = mask / jnp.maximum(mask.sum(-1, keepdims=True), 1)
            return jnp.einsum("bt,btd->bd", weights.astype(keys.dtype), keys), weights.astype(jnp.float32)
        dense = lambda n, name: nn.Dense(n, kernel_init=glorot_uniform, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=name)
        query = PReLU(param_dtype=self.param_dtype, name="query_prelu")(dense(keys.shape[-1], "query")(item_emb))
        queries = jnp.broadcast_to(query[:, None, :], keys.shape)                       # [B, T, D]
        x = jnp.concatenate([queries, keys, queries - keys, queries * keys], axis=-1)  # [B, T, 4D]
        for i, width in enumerate(self.hidden):
            x = nn.sigmoid(dense(width, f"att_{i}")(x))
        scores = dense(1, "att_out")(x)[..., 0].astype(jnp.float32)                    # [B, T]
        if self.mode == "softmax":
            weights = jax.nn.softmax(jnp.where(mask, scores, ATTENTION_PADDING), axis=-1)
        else:
            weights = jnp.where(mask, scores, 0.0)
        output = jnp.einsum("bt,btd->bd", weights.astype(keys.dtype), keys)
        # An empty history softmaxes to 1/T on padding; those keys are zero, so only the report changes.
        return output, jnp.where(mask, weights, 0.0)


class DIN(nn.Module):
    """Deep Interest Network with DeepRec's layer sizes, initialisers and BN behaviour.

    batch_norm: 'frozen' (DeepRec parity), 'batch' (batch statistics while training, moving averages
    in evaluation) or 'none'. activation: 'relu' (DeepRec) or 'dice' for the top MLP's hidden layers.
    attention: 'softmax' (DeepRec), 'unnormalized' (DIN paper), 'mean' (uniform weights instead of the
    attention unit) or 'none' (DIEN's BaseModel: concat(uid, item, sum of history) - plain sum pooling).
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
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.batch_norm not in ("frozen", "batch", "none"):
            raise ValueError(f"model.batch_norm must be 'frozen', 'batch' or 'none', got {self.batch_norm!r}")
        if self.activation not in ("relu", "dice"):
            raise ValueError(f"model.activation must be 'relu' or 'dice', got {self.activation!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"model.attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        e = self.embedding_dim
        self.uid_table = self.param("uid_table", tf1_truncated_normal(e**-0.5), (self.vocab_sizes["uid"], e),
                                    self.param_dtype)
        self.mid_table = self.param("mid_table", glorot_uniform, (self.vocab_sizes["mid"], e), self.param_dtype)
        self.cat_table = self.param("cat_table", glorot_uniform, (self.vocab_sizes["cat"], e), self.param_dtype)
        self.attention_unit = AttentionUnit(self.attention_hidden, self.attention, self.dtype, self.param_dtype)
        if self.batch_norm == "frozen":
            self.bn = FrozenBatchNorm(param_dtype=self.param_dtype)
        elif self.batch_norm == "batch":
            self.bn = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
        dense = lambda n: nn.Dense(n, kernel_init=glorot_uniform, dtype=self.dtype,  # noqa: E731
                                   param_dtype=self.param_dtype)
        self.hidden_layers = [dense(n) for n in self.mlp_hidden]
        if self.activation == "dice":
            self.dice = [Dice(param_dtype=self.param_dtype) for _ in self.mlp_hidden]
        self.pre_logit = dense(self.mlp_out)
        self.logit = dense(1)

    def embed(self, batch: Mapping[str, Array]) -> dict[str, Array]:
        """Table lookups: uid [B, E], item [B, D], history [B, T, D] (padded positions zeroed)."""
        item = jnp.concatenate([self.mid_table[batch["mid"]], self.cat_table[batch["cat"]]], axis=-1)
        history = jnp.concatenate([self.mid_table[batch["hist_mids"]], self.cat_table[batch["hist_cats"]]], axis=-1)
        return {"uid": self.uid_table[batch["uid"]], "item": item, "history": history}

    def from_embedded(self, embedded: Mapping[str, Array], mask: Array, row_weight: Array,
                      train: bool = False) -> tuple[Array, Array]:
        """Everything after the lookups: returns (logits [B] in fp32, attention weights [B, T])."""
        uid = embedded["uid"].astype(self.dtype)
        item = embedded["item"].astype(self.dtype)
        history = embedded["history"].astype(self.dtype) * mask[..., None].astype(self.dtype)  # [B, T, D]
        history_sum = history.sum(axis=1)                                                        # [B, D]
        if self.attention == "none":  # DIEN's BaseModel: plain sum pooling, no interaction terms
            weights = mask.astype(jnp.float32)
            x = jnp.concatenate([uid, item, history_sum], axis=-1)                               # [B, 90]
        else:
            attended, weights = self.attention_unit(item, history, mask)
            x = jnp.concatenate([uid, item, history_sum, item * history_sum, attended], axis=-1)  # [B, 162]
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
        return self.from_embedded(self.embed(batch), batch["hist_mask"], batch["weight"], train)
