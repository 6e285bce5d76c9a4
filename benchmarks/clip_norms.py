"""How large the embedding tables' gradients are next to the clip norm (5), in DeepRec's and in din_jax's terms.

  python benchmarks/clip_norms.py [--workdir /tmp/din_clip] [--checkpoints WORKDIR/checkpoints] [--batches 20]

DeepRec clips each gradient with tf.clip_by_norm before apply_gradients. A table's gradient there is an
IndexedSlices with one value per lookup (the target's and every history position's; duplicates not summed), so its
norm is over the lookups; din_jax clips the row gradients with duplicates summed. The two differ only when a norm
nears the clip. This prints both norms per table, the largest over the first train batches of the default data, at
initialisation or for a trained run's latest checkpoint.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from configs import default
from din_jax import checkpoint as checkpoint_lib
from din_jax import steps, train
from din_jax.model import DIN, history_positions
from input_pipeline import batches as batches_lib

# Each table: its columns in DIN.embed's output (target, history) and the half of the 36-wide item it fills.
TABLES = {"mid": ("mid", "hist_mids", slice(0, 18)), "cat": ("cat", "hist_cats", slice(18, 36))}


def norms(model: DIN, params, batch) -> dict[str, tuple[float, float]]:
    """Per table: (norm over lookups, norm of the rows with duplicates summed) of the loss gradient."""
    embedded = model.apply({"params": params}, batch, method=DIN.embed)
    floats = {k: v for k, v in embedded.items() if k in ("uid", "item", "keys")}

    def loss(e):
        logits, _ = model.apply({"params": params}, {**embedded, **e}, batch["weight"],
                                method=DIN.from_embedded)
        return steps.weighted_sigmoid_cross_entropy(logits, batch["label"], batch["weight"])

    grads = jax.grad(loss)(floats)
    flat, _ = history_positions(batch)
    out = {}
    for name, (target, history, half) in TABLES.items():
        ids = jnp.concatenate([batch[target], jnp.asarray(batch[history]).reshape(-1).at[flat].get(mode="fill",
                                                                                                  fill_value=0)])
        values = jnp.concatenate([grads["item"][:, half], grads["keys"][:, half]])
        rows = jax.ops.segment_sum(values, ids, int(ids.max()) + 1)
        out[name] = (float(jnp.linalg.norm(values)), float(jnp.linalg.norm(rows)))
    users = jax.ops.segment_sum(grads["uid"], batch["uid"], int(batch["uid"].max()) + 1)
    out["uid"] = (float(jnp.linalg.norm(grads["uid"])), float(jnp.linalg.norm(users)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/din_clip")
    parser.add_argument("--checkpoints", default="", help="a run's checkpoint directory (default: initialisation)")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    config = default.get_config()
    data = train.load_data(config, args.workdir)
    trainer = train.create_trainer(config, data.vocab_sizes)
    state = trainer.init_state(config)
    if args.checkpoints:
        checkpointer = checkpoint_lib.Checkpointer(args.checkpoints, 0, 1)
        state = trainer.readable(checkpointer.restore_latest(state))
        checkpointer.close()
    largest: dict[str, tuple[float, float]] = {}
    for i, batch in enumerate(batches_lib.eval_batches(data.train, config.batch_size, config.max_seq_length)):
        if i == args.batches:
            break
        for name, pair in norms(trainer.model, state.params, batch).items():
            largest[name] = tuple(max(a, b) for a, b in zip(largest.get(name, (0.0, 0.0)), pair))
    print(f"largest over {args.batches} batches (clip norm {config.clip_norm}):")
    for name, (lookups, rows) in largest.items():
        print(f"  {name}: over lookups (DeepRec) {lookups:.4f}, rows summed (din_jax) {rows:.4f}")


if __name__ == "__main__":
    main()
