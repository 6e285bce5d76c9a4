"""Checks a run's config before any work starts, so a bad value is one sentence naming its key."""

from __future__ import annotations

import ml_collections

from din_jax.host_embeddings import KIND_CHOICES, table_kinds
from din_jax.model import ATTENTION_MODES
from din_jax.optim import OPTIMIZERS


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and the allowed values."""


_CHOICES = {
    "dataset": ("synthetic", "dien"),
    "history_keep": ("auto", "first", "last"),
    "optimizer": OPTIMIZERS,
    "precision": ("fp32", "mixed_bf16", "bf16"),
    "model.batch_norm": ("frozen", "batch", "none"),
    "model.activation": ("relu", "dice"),
    "model.attention": ATTENTION_MODES,
    "ev_filter": ("", "counter", "cbf"),
    "ev_elimination": ("", "gstep", "l2"),
    "multihash_combiner": ("add", "mul", "concat"),
    "embeddings.uid": KIND_CHOICES,
    "embeddings.mid": KIND_CHOICES,
    "embeddings.cat": KIND_CHOICES,
}
_POSITIVE = ("prefetch_depth", "adagrad_decay_step", "batch_size", "eval_batch_size", "max_seq_length", "log_every_steps", "learning_rate", "clip_norm",
             "keep_checkpoint_max", "model.embedding_dim", "ev_filter_freq", "adaptive_hash_bucket_size",
             "adaptive_promote_freq", "dynamic_block_size", "dynamic_decay")
_NON_NEGATIVE = ("intra", "ev_capacity", "ev_steps_to_live", "incremental_ckpt", "workqueue_wait_ms", "pack_granularity", "steps", "save_steps", "timeline", "eval_every_steps", "micro_batch", "shard_min_rows")


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
    if not 0 < config.adagrad_decay_rate < 1:
        raise ConfigError(f"config.adagrad_decay_rate={config.adagrad_decay_rate!r} must lie strictly between 0 and 1 "
                          "(DeepRec's accumulator_decay_rate; its default is 0.9)")
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
    if config.optimizer in ("adamasync", "lazyadam") and not config.sparse_embeddings:
        raise ConfigError(f"config.optimizer={config.optimizer!r} updates embedding rows lazily and needs "
                          "config.sparse_embeddings=True")
    if config.shard_embeddings and not config.sparse_embeddings:
        raise ConfigError("config.shard_embeddings=True updates the touched rows of each table shard and needs "
                          "config.sparse_embeddings=True")
    if config.workqueue and config.shard_embeddings:
        raise ConfigError("config.workqueue=True hands batches out at run time, so the all-to-all buckets of "
                          "config.shard_embeddings=True cannot be sized ahead (din_jax/sharded_tables.py); turn one "
                          "of them off")
    if config.workqueue and tuple(config.bucket_boundaries):
        raise ConfigError("config.workqueue=True hands out units of shuffled examples and does not combine with "
                          "config.bucket_boundaries (length-grouped batches); set bucket_boundaries=() "
                          "(packing already skips padded positions)")
    kinds = table_kinds(config)
    special = sorted({kind for kind in kinds.values() if kind != "dense"})
    if special and not config.sparse_embeddings:
        raise ConfigError(f"embedding kinds {special} update looked-up rows only and need config.sparse_embeddings=True")
    if "multihash" in special and config.shard_embeddings:
        raise ConfigError("embedding kind 'multihash' (two rows per lookup) does not combine with "
                          "config.shard_embeddings=True; turn one of them off (ev, adaptive and dynamic tables split "
                          "over the devices with their id mappings)")
    if special and config.workqueue:
        raise ConfigError(f"embedding kinds {special} map ids on the host from whole global batches, which the "
                          "work queue does not give every process; set config.workqueue=False")
    if config.incremental_ckpt and (config.workqueue or config.shard_embeddings or not config.sparse_embeddings):
        raise ConfigError("config.incremental_ckpt needs config.sparse_embeddings=True, and does not combine with "
                          "config.workqueue or config.shard_embeddings")
    if config.dynamic_ev or "dynamic" in kinds.values():
        if config.model.embedding_dim % config.dynamic_block_size:
            raise ConfigError(f"config.dynamic_block_size={config.dynamic_block_size} must divide "
                              f"config.model.embedding_dim={config.model.embedding_dim}")
    for key in ("ev_filter", "ev_elimination"):
        if config[key] and not any(kind in ("ev", "dynamic") for kind in kinds.values()):
            raise ConfigError(f"config.{key}={config[key]!r} applies to EmbeddingVariable features; none is one "
                              "(set config.ev=True or config.embeddings.<feature>='ev')")
    if config.multihash_combiner == "concat" and config.model.embedding_dim % 2 and "multihash" in kinds.values():
        raise ConfigError(f"config.multihash_combiner='concat' joins two half rows; config.model.embedding_dim="
                          f"{config.model.embedding_dim} must be even")
    if config.dataset == "dien" and not config.data_dir:
        raise ConfigError("config.dataset='dien' needs --config.data_dir pointing at a prepared DIEN directory "
                          "(python -m input_pipeline.amazon --out_dir DIR)")
