"""DeepRec's DIN in PyTorch, layer for layer as din_jax.model.DIN, for the peer benchmarks.

Same layer sizes, TF1 initialisers, -2^32+1 attention masking, frozen BatchNorm
(x * gamma / sqrt(1 + 1e-3) + beta), mean sigmoid cross-entropy over weight-1 rows, each gradient
tensor clipped to norm 5 (tf.clip_by_norm: g * 5 / max(||g||, 5)) and TF1's Adam rule. It consumes
the numpy batches of input_pipeline.batches (uid, mid, cat [B]; hist_mids, hist_cats, hist_mask [B, T];
label, weight [B]).

torch.optim.Adam divides by sqrt(v_hat) + eps (epsilon inside the bias correction); TF1, DeepRec and
din_jax divide by sqrt(v) + eps with the correction folded into the step size, so `TF1Adam` below
implements that rule for dense and sparse gradients.

Embedding gradients and table updates (`embedding_grads`):
  'lazy' (default): nn.Embedding(sparse=True) + torch.optim.SparseAdam for the tables, TF1Adam for
      the rest. Only the rows a step touches change, moments included (TF's LazyAdam, DeepRec's
      adamasync): the rule of din_jax's default row-sparse update (`optim.adam_rows`); SparseAdam puts
      epsilon where TF1 does and counts steps per table, which is the global step in DIN.
  'sparse': nn.Embedding(sparse=True) + TF1Adam on the coalesced rows with TF1's sparse rule
      (`_apply_sparse`): every row's moments decay and every row moves - DeepRec's Adam, the rule of
      din_jax with `sparse_embeddings=False` - without a table-sized gradient.
  'dense': nn.Embedding() and TF1Adam: the same numbers as 'sparse' through table-sized gradients.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ATTENTION_PADDING = -(2.0**32) + 1
BN_EPSILON = 1e-3
EMBEDDING_GRADS = ("lazy", "sparse", "dense")
TABLES = ("uid_table", "mid_table", "cat_table")
ID_KEYS = ("uid", "mid", "cat", "hist_mids", "hist_cats", "hist_mask")


def set_threads(num_threads: int | None = None) -> None:
    """Intra-op threads = the machine's cores (or `num_threads`)."""
    torch.set_num_threads(num_threads or os.cpu_count() or 1)


def _glorot_linear(fan_in: int, fan_out: int) -> nn.Linear:
    """nn.Linear with a glorot-uniform weight and zero bias (tf.layers.dense defaults)."""
    layer = nn.Linear(fan_in, fan_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TorchDIN(nn.Module):
    """DIN: embeddings, attention unit, frozen BN and top MLP with din_jax's sizes and initialisers."""

    def __init__(self, vocab_sizes: Mapping[str, int], embedding_dim: int = 18,
                 attention_hidden: tuple[int, ...] = (80, 40), mlp_hidden: tuple[int, ...] = (200, 80),
                 mlp_out: int = 2, sparse: bool = True):
        """Builds the tables and layers; `sparse` makes the tables' gradients sparse (nn.Embedding(sparse=True))."""
        super().__init__()
        e, d = embedding_dim, 2 * embedding_dim
        self.uid_table = nn.Embedding(vocab_sizes["uid"], e, sparse=sparse)
        self.mid_table = nn.Embedding(vocab_sizes["mid"], e, sparse=sparse)
        self.cat_table = nn.Embedding(vocab_sizes["cat"], e, sparse=sparse)
        std = e**-0.5  # TF1 truncated_normal_initializer: N(0, std) redrawn outside 2 std
        nn.init.trunc_normal_(self.uid_table.weight, 0.0, std, -2 * std, 2 * std)
        nn.init.xavier_uniform_(self.mid_table.weight)
        nn.init.xavier_uniform_(self.cat_table.weight)
        self.query = _glorot_linear(d, d)
        self.query_prelu = nn.PReLU(d, init=0.1)
        widths = (4 * d, *attention_hidden)
        self.attention_layers = nn.ModuleList(_glorot_linear(a, b) for a, b in zip(widths, widths[1:]))
        self.attention_out = _glorot_linear(widths[-1], 1)
        top = e + 4 * d  # uid, item, sum(history), item * sum(history), attention output: 162
        self.bn_scale = nn.Parameter(torch.ones(top))
        self.bn_bias = nn.Parameter(torch.zeros(top))
        widths = (top, *mlp_hidden)
        self.hidden_layers = nn.ModuleList(_glorot_linear(a, b) for a, b in zip(widths, widths[1:]))
        self.pre_logit = _glorot_linear(widths[-1], mlp_out)
        self.logit = _glorot_linear(mlp_out, 1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B]."""
        mask = batch["hist_mask"]                                                            # [B, T]
        uid = self.uid_table(batch["uid"])                                                   # [B, E]
        item = torch.cat([self.mid_table(batch["mid"]), self.cat_table(batch["cat"])], -1)   # [B, D]
        history = torch.cat([self.mid_table(batch["hist_mids"]), self.cat_table(batch["hist_cats"])], -1)
        history = history * mask.unsqueeze(-1)                                               # [B, T, D]
        history_sum = history.sum(1)                                                         # [B, D]
        query = self.query_prelu(self.query(item)).unsqueeze(1).expand_as(history)           # [B, T, D]
        x = torch.cat([query, history, query - history, query * history], -1)                # [B, T, 4D]
        for layer in self.attention_layers:
            x = torch.sigmoid(layer(x))
        scores = self.attention_out(x).squeeze(-1)                                           # [B, T]
        weights = torch.softmax(torch.where(mask, scores, torch.full_like(scores, ATTENTION_PADDING)), -1)
        attended = torch.bmm(weights.unsqueeze(1), history).squeeze(1)                       # [B, D]
        x = torch.cat([uid, item, history_sum, item * history_sum, attended], -1)            # [B, 162]
        x = x * (self.bn_scale / math.sqrt(1.0 + BN_EPSILON)) + self.bn_bias
        for layer in self.hidden_layers:
            x = F.relu(layer(x))
        return self.logit(self.pre_logit(x)).squeeze(-1)


class TF1Adam(torch.optim.Optimizer):
    """TF1 AdamOptimizer: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); w -= lr_t * m / (sqrt(v) + eps).

    Sparse (coalesced) gradients follow TF1's `_apply_sparse`: m = b1 * m, then m[rows] += (1 - b1) * g;
    v likewise; every row takes the step. Numerically the dense rule with zero gradient rows.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8):
        """One step count for all parameters, as TF1's beta-power accumulators."""
        super().__init__(params, dict(lr=lr, b1=b1, b2=b2, eps=eps))
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        """Applies one update to every parameter that has a gradient."""
        self.t += 1
        for group in self.param_groups:
            lr, b1, b2, eps = group["lr"], group["b1"], group["b2"], group["eps"]
            lr_t = lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v, g = state["m"], state["v"], p.grad
                if g.is_sparse:
                    rows, values = g._indices()[0], g._values()
                    m.mul_(b1).index_add_(0, rows, values, alpha=1 - b1)
                    v.mul_(b2).index_add_(0, rows, values * values, alpha=1 - b2)
                else:
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-lr_t)


@torch.no_grad()
def clip_by_norm_per_tensor_(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """tf.clip_by_norm on each gradient in place: g * max_norm / max(||g||, max_norm); sparse ones coalesced first.

    torch.nn.utils.clip_grad_norm_ called per parameter does the same up to its 1e-6 in the denominator,
    but cannot take sparse gradients.
    """
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            values = p.grad._values()
        else:
            values = p.grad
        norm = torch.linalg.vector_norm(values)
        values.mul_(max_norm / torch.clamp(norm, min=max_norm))


class Trainer:
    """A TorchDIN with its optimizer(s): `train_step` on numpy batches, `predict` probabilities."""

    def __init__(self, vocab_sizes: Mapping[str, int], embedding_grads: str = "lazy", learning_rate: float = 1e-3,
                 clip_norm: float = 5.0, seed: int = 0):
        """Builds the model from `seed` and the optimizer for `embedding_grads` (see the module docstring)."""
        if embedding_grads not in EMBEDDING_GRADS:
            raise ValueError(f"embedding_grads must be one of {EMBEDDING_GRADS}, got {embedding_grads!r}")
        torch.manual_seed(seed)
        self.model = TorchDIN(vocab_sizes, sparse=embedding_grads != "dense")
        self.clip_norm = clip_norm
        if embedding_grads == "lazy":
            tables = [getattr(self.model, name).weight for name in TABLES]
            dense = [p for name, p in self.model.named_parameters() if name.split(".")[0] not in TABLES]
            self.optimizers = [TF1Adam(dense, learning_rate), torch.optim.SparseAdam(tables, learning_rate)]
        else:
            self.optimizers = [TF1Adam(self.model.parameters(), learning_rate)]

    def train_step(self, batch: Mapping[str, np.ndarray]) -> float:
        """One optimizer step on a numpy batch; returns the batch loss."""
        inputs = to_tensors(batch)
        loss = weighted_sigmoid_cross_entropy(self.model(inputs), inputs["label"], inputs["weight"])
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_by_norm_per_tensor_(self.model.parameters(), self.clip_norm)
        for optimizer in self.optimizers:
            optimizer.step()
        return loss.item()

    def train(self, batches: Iterable[Mapping[str, np.ndarray]], steps: int) -> float:
        """`steps` train steps on the next batches of `batches`; returns the last loss."""
        loss = float("nan")
        for _, batch in zip(range(steps), batches):
            loss = self.train_step(batch)
        return loss

    @torch.no_grad()
    def predict(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Click probabilities [B] as float32 numpy."""
        return torch.sigmoid(self.model(to_tensors(batch))).numpy()


def to_tensors(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The batch's arrays as tensors, without copying."""
    return {key: torch.from_numpy(np.asarray(batch[key])) for key in (*ID_KEYS, "label", "weight") if key in batch}


def weighted_sigmoid_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid cross-entropy over the weight-1 rows (din_jax.steps.weighted_sigmoid_cross_entropy)."""
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (losses * weights).sum() / torch.clamp(weights.sum(), min=1.0)


# din_jax parameter paths -> TorchDIN parameter names (flax kernels are [in, out], torch weights [out, in]).
_FLAX_NAMES = {
    ("uid_table",): "uid_table.weight",
    ("mid_table",): "mid_table.weight",
    ("cat_table",): "cat_table.weight",
    ("attention_unit", "query_prelu", "alpha"): "query_prelu.weight",
    ("bn", "scale"): "bn_scale",
    ("bn", "bias"): "bn_bias",
}
_FLAX_LAYERS = {
    ("attention_unit", "query"): "query",
    ("attention_unit", "att_0"): "attention_layers.0",
    ("attention_unit", "att_1"): "attention_layers.1",
    ("attention_unit", "att_out"): "attention_out",
    ("hidden_layers_0",): "hidden_layers.0",
    ("hidden_layers_1",): "hidden_layers.1",
    ("pre_logit",): "pre_logit",
    ("logit",): "logit",
}


def load_flax_params(model: TorchDIN, params: Mapping) -> None:
    """Copies a din_jax DIN param tree (default sizes, frozen BN, relu, softmax attention) into `model`."""
    def at(path):
        node = params
        for key in path:
            node = node[key]
        return np.asarray(node)

    values = {name: at(path) for path, name in _FLAX_NAMES.items()}
    for path, name in _FLAX_LAYERS.items():
        values[f"{name}.weight"] = at((*path, "kernel")).T
        values[f"{name}.bias"] = at((*path, "bias"))
    own = dict(model.named_parameters())
    if set(values) != set(own):
        raise ValueError(f"parameter names differ: {sorted(set(values) ^ set(own))}")
    with torch.no_grad():
        for name, value in values.items():
            own[name].copy_(torch.tensor(value))
