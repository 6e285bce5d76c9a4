"""Checks a run's config before any work starts, so a bad value is one sentence naming its key."""

from __future__ import annotations

import ml_collections

from din_jax.model import ATTENTION_MODES
from din_jax.optim import OPTIMIZERS


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and the allowed values."""


_CHOICES = {
    "dataset": ("synthetic", "dien"),
    "history_keep": ("first", "last"),
    "optimizer": OPTIMIZERS,
    "precision": ("fp32", "mixed_bf16", "bf16"),
    "model.batch_norm": ("frozen", "batch", "none"),
    "model.activation": ("relu", "dice"),
    "model.attention": ATTENTION_MODES,
}
_POSITIVE = ("prefetch_depth", "adagrad_decay_step", "adagrad_decay_rate", "batch_size", "eval_batch_size", "max_seq_length", "log_every_steps", "learning_rate", "clip_norm",
             "keep_checkpoint_max", "model.embedding_dim")
_NON_NEGATIVE = ("workqueue_wait_ms", "pack_granularity", "steps", "save_steps", "timeline", "eval_every_steps", "micro_batch")


def _get(config: ml_collections.ConfigDict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def validate(config: ml_collections.ConfigDict, num_shards: int = 1) -> None:
    """Raises ConfigError for the first impossible value or combination (num_shards: devices on the `data` axis)."""
    for key, allowed in _CHOICES.items():
        if _get(config, key) not in allowed:
            raise ConfigError(f"config.{key}={_get(config, key)!r} is not one of {', '.join(map(repr, allowed))}")
    for key in _POSITIVE:
        if not _get(config, key) > 0:
            raise ConfigError(f"config.{key}={_get(config, key)!r} must be positive")
    for key in _NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ConfigError(f"config.{key}={_get(config, key)!r} must be 0 or positive")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % num_shards:
            raise ConfigError(f"config.{key}={config[key]} is not divisible by the {num_shards} devices of this "
                              f"run (one batch shard each); choose a multiple of {num_shards}")
    if config.micro_batch > 1 and config.batch_size // num_shards % config.micro_batch:
        raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by config.micro_batch="
                          f"{config.micro_batch} x {num_shards} device(s) (each device splits its shard into "
                          "micro-batches); choose a micro_batch that divides it")
    if config.model.batch_norm == "batch" and num_shards > 1:
        raise ConfigError(f"config.model.batch_norm='batch' would normalise each of the {num_shards} devices' "
                          "shards with their own statistics; use 'frozen' (DeepRec parity) or 'none' in "
                          "multi-device runs")
    if config.optimizer == "adamasync" and not config.sparse_embeddings:
        raise ConfigError("config.optimizer='adamasync' updates embedding rows lazily and needs "
                          "config.sparse_embeddings=True")
    if config.shard_embeddings and not config.sparse_embeddings:
        raise ConfigError("config.shard_embeddings=True updates the touched rows of each table shard and needs "
                          "config.sparse_embeddings=True")
    if config.workqueue and tuple(config.bucket_boundaries):
        raise ConfigError("config.workqueue=True hands out units of shuffled examples and does not combine with "
                          "config.bucket_boundaries (length-grouped batches); set bucket_boundaries=() "
                          "(packing already skips padded positions)")
    if config.dataset == "dien" and not config.data_dir:
        raise ConfigError("config.dataset='dien' needs --config.data_dir pointing at a prepared DIEN directory "
                          "(python -m input_pipeline.amazon --out_dir DIR)")
