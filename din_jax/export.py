"""A trained DIN as a self-contained directory, and the model loaded back from it without the training code.

`python -m din_jax.export --workdir W --out DIR` (or export_model) rebuilds the model of a finished
training run from W/config.json, restores its latest checkpoint and writes DIR, atomically:

  manifest.json       format_version, inputs (name, dtype, shape), outputs, max_seq_length, history_keep,
                      the encoder, the checkpoint step, the platforms the function was lowered for
  inference.jaxexport the inference function, serialized by jax.export, batch dimension B symbolic:
                      (variables, batch) -> (click probabilities [B], attention weights [B, T])
  variables.npz       its first argument: params and batch_stats as '<collection>/<module>/.../<name>' arrays
  vocabularies.json   the encoder's tables: per id column keyed by vocabulary (uid, mid, cat) its tokens in
                      id order (null: unused id)
  config.json         the training run's config.json, as it was

A model with DeepRec's embedding kinds (din_jax.ev: ev, adaptive, multihash, dynamic; config.embeddings)
has encoder kind 'embeddings' and two more files, what maps a token to its table rows at inference:

  embeddings.json     per feature (uid, mid, cat): its kind, its keys ('raw': the token's 64-bit hash
                      din_jax.ev.hash_tokens, as training keyed it; 'vocabulary': its vocabulary id, unknown
                      tokens 0) and the options that rebuild its din_jax.ev mapping (ev.create(kind, **options))
  embeddings.npz      the mappings' state at the checkpoint (HostEmbeddings.state_dict(): 'embedding/<table>/<name>')

and the inference function takes, besides the id columns (then table rows), the columns the kinds add
(listed in the manifest's inputs): '<column>_r' (multihash: the second row) and '<column>_blocks' (dynamic:
live dimension blocks). Tokens map as in training's evaluation: mapping.map(keys, 0, train=False), so
an id without a row of its own reads zeros (ev, dynamic: not admitted or never seen) or its shared
hashed row (adaptive).

`din_jax.load_model(DIR)` needs only jax, numpy, din_jax.ev (numpy only) and these files (no configs/, no
din_jax.train):

  model = din_jax.load_model("DIR")
  model(batch)                 # encoded batch (see model.inputs) -> probabilities [B]
  model.predict(examples)      # raw tokens -> probabilities [N]
  model.explain(examples)      # -> (probabilities [N], attention over each example's history)

An example is a dict with uid, item, category, history_items and history_categories (lists, oldest
first). Histories longer than max_seq_length are cut as training cut them (history_keep 'first': the
oldest T entries, 'last': the newest T); tokens the vocabularies do not know map to id 0 (with embedding
kinds: as above).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from itertools import chain, repeat
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax import export as jax_export

from din_jax import ev  # numpy only: the embedding kinds' id -> row mappings
from din_jax import jsonfile

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FUNCTION_FILE = "inference.jaxexport"
VARIABLES_FILE = "variables.npz"
VOCABULARIES_FILE = "vocabularies.json"
EMBEDDINGS_FILE = "embeddings.json"
EMBEDDING_STATE_FILE = "embeddings.npz"
CONFIG_FILE = "config.json"
COLLECTIONS = ("params", "batch_stats")
PLATFORMS = ("cpu", "cuda")  # lowered for both: an export made on either runs on either
ID_COLUMNS = ("uid", "mid", "cat")
KEEP_CHOICES = ("first", "last")  # history_keep: the oldest or the newest max_seq_length entries
# The inference function's batch: name -> (dtype, shape); B is symbolic, T = max_seq_length.
INPUTS = {"uid": ("int32", ("B",)), "mid": ("int32", ("B",)), "cat": ("int32", ("B",)),
          "hist_mids": ("int32", ("B", "T")), "hist_cats": ("int32", ("B", "T")),
          "hist_mask": ("bool", ("B", "T")), "weight": ("float32", ("B",))}
# Each feature's table and the batch columns that look it up (din_jax.model.TABLES, kept here so that loading
# never imports flax), and the column suffixes of the embedding kinds' extra inputs (din_jax.model's).
FEATURE_COLUMNS = {"uid": ("uid",), "mid": ("mid", "hist_mids"), "cat": ("cat", "hist_cats")}
SECOND_ROW, BLOCKS = "_r", "_blocks"
RAW_KEYS, VOCABULARY_KEYS = "raw", "vocabulary"  # embeddings.json 'keys': a token's hash, or its vocabulary id
OUTPUTS = {"probabilities": ("float32", ("B",)), "attention": ("float32", ("B", "T"))}
DEFAULT_BATCH_SIZE = 1024

Batch = dict[str, np.ndarray]


class ExportError(Exception):
    """A model cannot be exported or loaded; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# Tokens -> ids


class Encoder:
    """Raw tokens -> the ids the model was trained with: one vocabulary per id column, unknown tokens -> 0.

    The ids are those of the training run's uid/mid/cat vocabularies (input_pipeline.dien). Models with
    DeepRec's embedding kinds use EmbeddingEncoder, which has the same `ids`, `lookup`, `inputs`, `spec`
    and `save`.
    """

    kind = "vocabulary"

    def __init__(self, tokens: Mapping[str, Sequence[str | None]]):
        missing = [column for column in ID_COLUMNS if column not in tokens]
        if missing:
            raise ExportError(f"vocabularies for {', '.join(missing)} are missing; export the model again")
        self.tokens = {column: list(tokens[column]) for column in ID_COLUMNS}
        self._ids = {column: _token_ids(self.tokens[column]) for column in ID_COLUMNS}

    @classmethod
    def from_vocabularies(cls, vocabularies: Mapping[str, Mapping[str, int]]) -> "Encoder":
        """From token -> id dicts (input_pipeline.dien.Vocabularies); ids may have gaps, not shared tokens."""
        return cls({column: token_table(column, vocabularies[column]) for column in ID_COLUMNS})

    def ids(self, column: str, tokens: Iterable[str]) -> np.ndarray:
        """The ids of `tokens` in vocabulary `column` ('uid', 'mid' or 'cat'), int32; unknown tokens -> 0."""
        return np.fromiter(map(self._ids[column].get, tokens, repeat(0)), np.int32)

    def unknown(self, column: str, tokens: Sequence[str]) -> int:
        """How many of `tokens` the vocabulary `column` lacks (they are scored as the unknown id 0)."""
        return _missing(self._ids[column], tokens)

    def lookup(self, batch: Batch) -> Batch:
        """The batch of ids as the inference function takes it: unchanged (the ids are the table rows)."""
        return batch

    def inputs(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """The inference function's inputs besides INPUTS: none."""
        return {}

    def spec(self) -> dict[str, str]:
        """The manifest's entry for this encoder."""
        return {"kind": self.kind, "file": VOCABULARIES_FILE}

    def save(self, directory: str) -> None:
        """Writes the vocabularies into `directory`."""
        with open(os.path.join(directory, VOCABULARIES_FILE), "w", encoding="utf-8") as f:
            json.dump(self.tokens, f, ensure_ascii=False, allow_nan=False)

    @classmethod
    def load(cls, directory: str, spec: Mapping[str, str]) -> "Encoder":
        """The encoder `save` wrote in `directory`."""
        return cls(_read_json(os.path.join(directory, spec["file"])))


def token_table(column: str, vocab: Mapping[str, int]) -> list[str | None]:
    """The tokens of a token -> id dict in id order (None: unused id); ExportError if two tokens share an id."""
    table: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, index in vocab.items():
        if table[index] is not None:
            raise ExportError(f"the {column} vocabulary gives id {index} to both {table[index]!r} and "
                              f"{token!r}; an export needs one token per id")
        table[index] = token
    return table


def _missing(ids: Mapping[str, int], tokens: Sequence[str]) -> int:
    """How many of `tokens` a token -> id vocabulary lacks."""
    return sum(token not in ids for token in tokens)


def _token_ids(tokens: Sequence[str | None]) -> dict[str, int]:
    return {token: i for i, token in enumerate(tokens) if token is not None}


class EmbeddingEncoder:
    """Raw tokens -> table rows through each feature's din_jax.ev mapping (DeepRec's embedding kinds).

    Per feature (uid, mid, cat): `features[f]` = {'kind', 'keys', 'options'} and its mapping's state in
    `state` (HostEmbeddings.state_dict() keys, 'embedding/<f>_table/<name>'). Tokens become keys as
    training keyed them ('raw': ev.hash_tokens, so a token training never saw is still its own id;
    'vocabulary': the vocabulary id in `tokens[f]`, unknown tokens 0); `lookup` maps the keys of a batch
    to rows as training's evaluation does, mapping.map(keys, 0, train=False), which changes nothing:
    padding and ids without a row read zeros ('no row'), adaptive ids without one their shared row.
    """

    kind = "embeddings"

    def __init__(self, features: Mapping[str, Mapping[str, Any]], tokens: Mapping[str, Sequence[str | None]],
                 state: Mapping[str, np.ndarray]):
        missing = [feature for feature in ID_COLUMNS if feature not in features]
        if missing:
            raise ExportError(f"the embeddings of {', '.join(missing)} are missing; export the model again")
        self.features = {feature: dict(features[feature]) for feature in ID_COLUMNS}
        self.tokens: dict[str, list[str | None]] = {}
        self._ids: dict[str, dict[str, int]] = {}
        self.mappings: dict[str, ev.IdMapping] = {}
        for feature, entry in self.features.items():
            if entry.get("keys") == VOCABULARY_KEYS:
                if feature not in tokens:
                    raise ExportError(f"the {feature} vocabulary is missing; export the model again")
                self.tokens[feature] = list(tokens[feature])
                self._ids[feature] = _token_ids(self.tokens[feature])
            elif entry.get("keys") != RAW_KEYS:
                raise ExportError(f"embedding {feature!r}: keys {entry.get('keys')!r} is not {RAW_KEYS!r} or "
                                  f"{VOCABULARY_KEYS!r}; load it with the din_jax that exported it")
            try:
                mapping = ev.create(entry["kind"], **entry["options"])
                mapping.load_state_dict(ev.table_state(state, f"{feature}_table"))
            except (KeyError, TypeError, ValueError) as e:
                raise ExportError(f"embedding {feature!r} ({entry.get('kind')!r}) cannot be rebuilt ({_first(e)}); "
                                  "export the model again with this din_jax") from None
            self.mappings[feature] = mapping

    def ids(self, column: str, tokens: Iterable[str]) -> np.ndarray:
        """The keys of `tokens` in feature `column` ('uid', 'mid' or 'cat'), int64 (see the class docstring)."""
        if column in self._ids:
            return np.fromiter(map(self._ids[column].get, tokens, repeat(0)), np.int64)
        return ev.hash_tokens(list(tokens))

    def unknown(self, column: str, tokens: Sequence[str]) -> int:
        """How many of `tokens` feature `column` has nothing learned for: vocabulary-keyed features' tokens outside
        the vocabulary (scored as id 0); raw-keyed ones' ids without a row (they read zeros, or adaptive's shared row)."""
        if column in self._ids:
            return _missing(self._ids[column], tokens)
        if not tokens:
            return 0
        found = self.mappings[column].map(ev.hash_tokens(list(tokens)), 0, train=False)
        return int(np.count_nonzero(found.slots >= found.num_rows))

    def lookup(self, batch: Batch) -> Batch:
        """A batch of keys as the inference function takes it: every id column replaced by table rows, plus
        the second rows and live blocks of the kinds that have them; padding rows (weight 0) and masked
        history positions look nothing up (HostEmbeddings.map_batch with train=False)."""
        out = dict(batch)
        real_rows = np.asarray(batch["weight"]) > 0
        for feature, mapping in self.mappings.items():
            columns = FEATURE_COLUMNS[feature]
            pieces = []
            for column in columns:
                keys = np.asarray(batch[column]).astype(np.int64)
                real = real_rows if keys.ndim == 1 else real_rows[:, None] & np.asarray(batch["hist_mask"])
                pieces.append(np.where(real, keys, -1).reshape(-1))
            found = mapping.map(np.concatenate(pieces), 0, train=False)
            offset = 0
            for column in columns:
                shape = np.shape(batch[column])
                part = slice(offset, offset + int(np.prod(shape)))
                out[column] = found.slots[part].reshape(shape).astype(np.int32)
                if found.slots_r is not None:
                    out[column + SECOND_ROW] = found.slots_r[part].reshape(shape).astype(np.int32)
                if found.blocks is not None:
                    out[column + BLOCKS] = found.blocks[part].reshape(shape).astype(np.int32)
                offset = part.stop
        return out

    def inputs(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """The inference function's inputs besides INPUTS: the second rows (multihash) and live blocks (dynamic)."""
        out = {}
        for feature, mapping in self.mappings.items():
            suffix = (SECOND_ROW if isinstance(mapping, ev.MultiHash) else
                      BLOCKS if isinstance(mapping, ev.DynamicDimension) else None)
            if suffix:
                out.update({column + suffix: ("int32", INPUTS[column][1]) for column in FEATURE_COLUMNS[feature]})
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every mapping's state under HostEmbeddings.state_dict()'s keys."""
        return {f"embedding/{feature}_table/{name}": value for feature, mapping in self.mappings.items()
                for name, value in mapping.state_dict().items()}

    def spec(self) -> dict[str, str]:
        """The manifest's entry for this encoder."""
        return {"kind": self.kind, "file": VOCABULARIES_FILE, "embeddings": EMBEDDINGS_FILE,
                "state": EMBEDDING_STATE_FILE}

    def save(self, directory: str) -> None:
        """Writes the vocabularies (of the vocabulary-keyed features), the kinds and options, and the state."""
        with open(os.path.join(directory, VOCABULARIES_FILE), "w", encoding="utf-8") as f:
            json.dump(self.tokens, f, ensure_ascii=False, allow_nan=False)
        jsonfile.write(os.path.join(directory, EMBEDDINGS_FILE), self.features)
        np.savez(os.path.join(directory, EMBEDDING_STATE_FILE), **self.state_dict())

    @classmethod
    def load(cls, directory: str, spec: Mapping[str, str]) -> "EmbeddingEncoder":
        """The encoder `save` wrote in `directory`."""
        features = _read_json(os.path.join(directory, spec["embeddings"]))
        tokens = _read_json(os.path.join(directory, spec["file"]))
        path = os.path.join(directory, spec["state"])
        try:
            with np.load(path, allow_pickle=False) as arrays:
                state = {key: arrays[key] for key in arrays.files}
        except FileNotFoundError:
            raise ExportError(f"{path}: missing; the export is incomplete - export the model again") from None
        except (OSError, ValueError) as e:
            raise ExportError(f"{path}: unreadable ({e}); export the model again") from None
        if not isinstance(features, dict) or not isinstance(tokens, dict):
            raise ExportError(f"{directory}: {spec['embeddings']} or {spec['file']} is not a JSON object; "
                              "export the model again")
        return cls(features, tokens, state)


ENCODERS = {Encoder.kind: Encoder, EmbeddingEncoder.kind: EmbeddingEncoder}


def load_encoder(directory: str, spec: Any) -> Encoder | EmbeddingEncoder:
    """The encoder of an export directory, by the manifest's entry `spec`."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in ENCODERS:
        raise ExportError(f"{directory}: encoder kind {kind!r} is not supported by this din_jax (it reads "
                          f"{', '.join(map(repr, ENCODERS))}); load it with the din_jax that exported it")
    try:
        return ENCODERS[kind].load(directory, spec)
    except KeyError as e:
        raise ExportError(f"{directory}: the manifest's encoder lacks {e}; export the model again") from None


def _first(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Raw examples -> batches


class Example(NamedTuple):
    """One example in raw tokens; histories oldest first, one category per history item."""

    uid: str
    item: str
    category: str
    history_items: Sequence[str]
    history_categories: Sequence[str]

    @classmethod
    def from_dict(cls, example: Any) -> "Example":
        """An example from a dict with these five fields (ids may be ints); ValueError says what is wrong."""
        if isinstance(example, Example):
            return example
        if not isinstance(example, Mapping):
            raise ValueError(f"an example must be a dict with {', '.join(cls._fields)}, got {type(example).__name__}")
        missing = [name for name in cls._fields if name not in example]
        if missing:
            raise ValueError(f"missing field {missing[0]!r} (an example needs {', '.join(cls._fields)})")
        fields = [_token(example[name], name) for name in cls._fields[:3]]
        histories = [_tokens(example[name], name) for name in cls._fields[3:]]
        if len(histories[0]) != len(histories[1]):
            raise ValueError(f"history_items has {len(histories[0])} entries but history_categories has "
                             f"{len(histories[1])}; each history item needs its category")
        return cls(*fields, *histories)


def _token(value: Any, name: str) -> str:
    """A token given as a string or an int (a numeric id), as a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{name} must be a string, got {value!r}")


def _tokens(values: Any, name: str) -> list[str]:
    """A history field: a list of string (or int) tokens."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings, got {type(values).__name__}")
    if all(isinstance(v, str) for v in values):
        return list(values)
    return [_token(v, f"{name} entry") for v in values]


def kept_history(history: Sequence[str], max_seq_length: int, keep: str) -> Sequence[str]:
    """The history entries the model sees, as input_pipeline.batches.make_batch cuts them."""
    return history[:max_seq_length] if keep == "first" else history[-max_seq_length:]


def make_batch(examples: Sequence[Example], encoder: Encoder | EmbeddingEncoder, max_seq_length: int, keep: str,
               size: int | None = None) -> Batch:
    """The inference function's batch for `examples`, padded with weight-0 rows up to `size` rows.

    Histories are cut to T = max_seq_length like training's batches (input_pipeline.batches.make_batch):
    keep='first' keeps the oldest T entries, 'last' the newest T; padded positions hold id 0, mask False.
    An EmbeddingEncoder then maps the ids to table rows (and adds its kinds' columns, see its `lookup`).
    """
    n = len(examples)
    size = n if size is None else size
    mids = [kept_history(e.history_items, max_seq_length, keep) for e in examples]
    cats = [kept_history(e.history_categories, max_seq_length, keep) for e in examples]
    mask = np.zeros((size, max_seq_length), bool)
    mask[:n] = np.arange(max_seq_length) < np.array([len(h) for h in mids], np.int64)[:, None]   # [B, T]
    return encoder.lookup({
        "uid": _padded(encoder.ids("uid", (e.uid for e in examples)), size),
        "mid": _padded(encoder.ids("mid", (e.item for e in examples)), size),
        "cat": _padded(encoder.ids("cat", (e.category for e in examples)), size),
        "hist_mids": _scattered(encoder.ids("mid", chain.from_iterable(mids)), mask),
        "hist_cats": _scattered(encoder.ids("cat", chain.from_iterable(cats)), mask),
        "hist_mask": mask,
        "weight": (np.arange(size) < n).astype(np.float32),
    })


def _padded(ids: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, ids.dtype)
    out[:len(ids)] = ids
    return out


def _scattered(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, T] of ids' dtype holding `ids` (row-major) at the True positions of `mask`, 0 elsewhere."""
    out = np.zeros(mask.shape, ids.dtype)
    out[mask] = ids
    return out


def history_attention(weights: np.ndarray, history_length: int, max_seq_length: int, keep: str) -> np.ndarray:
    """One example's attention weights [T] laid over its whole history: 0 for entries cut off by truncation."""
    kept = min(history_length, max_seq_length)
    out = np.zeros(history_length, np.float32)
    start = 0 if keep == "first" else history_length - kept
    out[start:start + kept] = weights[:kept]
    return out


def padded_size(n: int, batch_size: int) -> int:
    """The rows a chunk of n examples is padded to: the next power of two, at most batch_size (few compiles)."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


# ---------------------------------------------------------------------------------------------
# The loaded model


class ExportedModel:
    """A model exported by export_model, loaded with jax, numpy and din_jax.ev only.

    `inputs`: the inference function's batch, name -> (dtype, dims): INPUTS, plus the columns of the
    embedding kinds of a model that has them ('<column>_r', '<column>_blocks'); `encode` makes it.
    """

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.manifest = _read_manifest(self.directory)
        self.max_seq_length = int(self.manifest["max_seq_length"])
        self.history_keep = self.manifest["history_keep"]
        if self.history_keep not in KEEP_CHOICES:
            raise ExportError(f"{self.directory}: history_keep {self.history_keep!r} is not one of {KEEP_CHOICES}; "
                              "export the model again")
        self.encoder = load_encoder(self.directory, self.manifest.get("encoder"))
        self.inputs = _manifest_inputs(self.directory, self.manifest, self.encoder)
        self.config = _read_json(os.path.join(self.directory, CONFIG_FILE))
        with open(os.path.join(self.directory, FUNCTION_FILE), "rb") as f:
            self._function = jax_export.deserialize(bytearray(f.read()))
        self._variables = jax.device_put(_load_variables(os.path.join(self.directory, VARIABLES_FILE)))

    def apply(self, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [B], attention weights [B, T]) of an encoded batch (`inputs`; weight defaults to 1)."""
        probabilities, weights = self._dispatch(batch)
        return np.asarray(probabilities), np.asarray(weights)

    def __call__(self, batch: Mapping[str, Any]) -> np.ndarray:
        """Click probabilities [B] of an encoded batch (see `inputs`)."""
        return np.asarray(self._dispatch(batch)[0])

    def _dispatch(self, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        """Starts the inference function on `batch` (checked and cast); returns its outputs without waiting."""
        return self._function.call(self._variables, self._checked(batch))

    def _checked(self, batch: Mapping[str, Any]) -> Batch:
        """`batch` as the function's inputs: every name of `inputs`, right dtypes, shapes [B] and [B, T]."""
        missing = [name for name in self.inputs if name not in batch and name != "weight"]
        if missing:
            raise ValueError(f"the batch has no {missing[0]!r} (inputs: {', '.join(self.inputs)})")
        rows = np.shape(batch["uid"])[:1]
        if "weight" not in batch:
            batch = {**batch, "weight": np.ones(rows, np.float32)}
        out = {}
        for name, (dtype, dims) in self.inputs.items():
            value = np.asarray(batch[name], dtype)
            expected = rows + ((self.max_seq_length,) if len(dims) == 2 else ())
            if value.shape != expected:
                raise ValueError(f"batch[{name!r}] has shape {value.shape}, expected {expected} "
                                 f"({', '.join(dims)} with T = max_seq_length = {self.max_seq_length})")
            out[name] = value
        return out

    def encode(self, examples: Sequence[Example], size: int | None = None) -> Batch:
        """The encoded batch of `examples` (raw tokens), padded with weight-0 rows up to `size`: the
        function's inputs (ids, or with embedding kinds table rows and their extra columns)."""
        return make_batch(examples, self.encoder, self.max_seq_length, self.history_keep, size)

    def unknown_tokens(self, examples: Sequence[Example]) -> dict[str, int]:
        """Per feature (uid, mid, cat), how many tokens of `examples` (targets and histories) the model has nothing
        learned for (see the encoder's `unknown`)."""
        tokens = {"uid": [e.uid for e in examples],
                  "mid": [e.item for e in examples] + [t for e in examples for t in e.history_items],
                  "cat": [e.category for e in examples] + [t for e in examples for t in e.history_categories]}
        return {column: self.encoder.unknown(column, tokens[column]) for column in ID_COLUMNS}

    def score(self, examples: Sequence[Example], size: int) -> tuple[jax.Array, jax.Array]:
        """Starts scoring `examples` padded to `size` rows (each new size compiles once); returns without waiting."""
        return self._dispatch(self.encode(examples, size))

    def predict(self, examples: Iterable[Any], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Click probabilities [N] of raw-token examples (dicts, see Example), float32."""
        probabilities, _ = self._run(examples, batch_size, explain=False)
        return probabilities

    def explain(self, examples: Iterable[Any], batch_size: int = DEFAULT_BATCH_SIZE
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(probabilities [N], per example its attention weights over its history, in history order).

        Each example's weights have one entry per history item given; entries cut off by truncation
        (beyond max_seq_length) get 0. With softmax attention the weights of a non-empty history sum to 1.
        """
        return self._run(examples, batch_size, explain=True)

    def _run(self, examples: Iterable[Any], batch_size: int, explain: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        checked = []
        for i, example in enumerate(examples):
            try:
                checked.append(Example.from_dict(example))
            except ValueError as e:
                raise ValueError(f"example {i}: {e}") from None
        probabilities, attention = [], []
        for start in range(0, len(checked), batch_size):
            chunk = checked[start:start + batch_size]
            p, w = self.score(chunk, padded_size(len(chunk), batch_size))
            probabilities.append(np.asarray(p)[:len(chunk)])
            if explain:
                weights = np.asarray(w)
                attention += [self.history_attention(weights[i], len(e.history_items)) for i, e in enumerate(chunk)]
        return (np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32)), attention

    def history_attention(self, weights: np.ndarray, history_length: int) -> np.ndarray:
        """One example's weights [T] laid over its whole given history (see history_attention)."""
        return history_attention(weights, history_length, self.max_seq_length, self.history_keep)


def load_model(directory: str) -> ExportedModel:
    """The model exported to `directory` by `python -m din_jax.export`."""
    return ExportedModel(directory)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path}: missing; the export is incomplete - export the model again") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({e}); export the model again") from None


def _read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of an export directory, checked for a format this code reads."""
    if not os.path.isdir(directory):
        raise ExportError(f"{directory}: no such model directory; create one with "
                          "`python -m din_jax.export --workdir WORKDIR --out DIR`")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ExportError(f"{directory}: not an exported model (no {MANIFEST}); create one with "
                          "`python -m din_jax.export --workdir WORKDIR --out DIR`")
    manifest = _read_json(path)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {version!r} is not {FORMAT_VERSION}, the one this din_jax "
                          "reads; export the model again with this din_jax")
    return manifest


def _manifest_inputs(directory: str, manifest: Mapping[str, Any], encoder: Encoder | EmbeddingEncoder
                     ) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The function's inputs as the manifest lists them: name -> (dtype, dims); ExportError unless they are
    INPUTS plus the encoder's extra columns (a manifest that does not fit its files)."""
    try:
        inputs = {name: (spec["dtype"], tuple(spec["shape"])) for name, spec in manifest["inputs"].items()}
    except (KeyError, TypeError, AttributeError):
        raise ExportError(f"{directory}: the manifest's inputs are malformed; export the model again") from None
    expected = {**INPUTS, **encoder.inputs()}
    if inputs != expected:
        raise ExportError(f"{directory}: the manifest's inputs ({', '.join(inputs)}) are not those its encoder "
                          f"makes ({', '.join(expected)}); export the model again")
    return expected


def _load_variables(path: str) -> dict[str, Any]:
    """params and batch_stats from an npz of '<collection>/<module>/.../<name>' arrays."""
    variables: dict[str, Any] = {name: {} for name in COLLECTIONS}
    try:
        with np.load(path) as arrays:
            for key in arrays.files:
                *parents, leaf = key.split("/")
                node = variables
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = arrays[key]
    except FileNotFoundError:
        raise ExportError(f"{path}: missing; the export is incomplete - export the model again") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({e}); export the model again") from None
    return variables


# ---------------------------------------------------------------------------------------------
# Export


def export_model(workdir: str, out_dir: str, overwrite: bool = False) -> str:
    """Exports the latest checkpoint of the training run in `workdir` to `out_dir`; returns out_dir.

    The directory appears whole or not at all (written beside it, then renamed); an existing one is
    replaced only with `overwrite`.
    """
    out_dir = os.fspath(out_dir)
    run = _read_run(os.fspath(workdir))
    if os.path.lexists(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another --out")
    import ml_collections  # the training code, imported only here: loading a model never needs it

    from din_jax import checkpoint as checkpoint_lib
    from din_jax import host_embeddings, whole_tables
    from input_pipeline import dien
    from input_pipeline.errors import DataError

    config = ml_collections.ConfigDict(run["config"])
    checkpoints = config.get("checkpoint_dir") or os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise ExportError(f"{workdir}: no checkpoint ({checkpoints} does not exist); {_train_hint(workdir)}")
    try:
        vocabularies = dien.load_vocabularies(run["data_dir"])
        id_sizes = vocabularies.sizes
        if host_embeddings.uses_raw_ids(config) and not config.ev_capacity:  # as train.load_data sizes them
            id_sizes = dien.open_vocabularies(run["data_dir"], vocabularies).sizes
    except DataError as e:
        raise ExportError(f"cannot read the vocabularies the run in {workdir} trained with ({e})") from None
    tokens = {column: token_table(column, getattr(vocabularies, column)) for column in ID_COLUMNS}
    try:  # tables split over devices (config.shard_embeddings) come back whole, their id mappings merged
        trainer, restored = whole_tables.restore_whole(config, vocabularies.sizes, id_sizes, checkpoints)
    except checkpoint_lib.CheckpointError as e:
        raise ExportError(str(e)) from None
    if restored is None:
        raise ExportError(f"{workdir}: no checkpoint in {checkpoints}; {_train_hint(workdir)}")
    state, extra = restored
    state = trainer.readable(state)  # exact Adam's checkpoints keep untouched rows lagging (Trainer.readable)
    if all(isinstance(m, ev.DenseVocabulary) for m in trainer.host.mappings.values()):
        encoder: Encoder | EmbeddingEncoder = Encoder(tokens)
    else:
        encoder = _embedding_encoder(trainer.host, extra, tokens, config, f"{checkpoints}/{int(state.step)}")
    variables = {"params": trainer.logical_params(state), "batch_stats": jax.device_get(state.batch_stats)}
    stored = jax.tree.map(_storable, variables)
    inputs = {**INPUTS, **encoder.inputs()}
    function = _export_function(trainer.model, jax.tree.map(lambda x: x.dtype, variables), stored,
                                config.max_seq_length, inputs)
    manifest = {
        "format_version": FORMAT_VERSION,
        "inputs": {name: {"dtype": dtype, "shape": list(dims)} for name, (dtype, dims) in inputs.items()},
        "outputs": {name: {"dtype": dtype, "shape": list(dims)} for name, (dtype, dims) in OUTPUTS.items()},
        "max_seq_length": int(config.max_seq_length),
        "history_keep": config.history_keep,
        "encoder": encoder.spec(),
        "step": int(state.step),
        "platforms": list(function.platforms),
        "jax_version": jax.__version__,
    }
    with _atomic_directory(out_dir) as tmp:
        with open(os.path.join(tmp, FUNCTION_FILE), "wb") as f:
            f.write(function.serialize())
        np.savez(os.path.join(tmp, VARIABLES_FILE), **_flatten(stored))
        encoder.save(tmp)
        jsonfile.write(os.path.join(tmp, CONFIG_FILE), run)
        jsonfile.write(os.path.join(tmp, MANIFEST), manifest)
    return out_dir


def _read_run(workdir: str) -> dict[str, Any]:
    """The workdir's config.json ({'config': ..., 'data_dir': ...}), as training wrote it."""
    if not os.path.isdir(workdir):
        raise ExportError(f"{workdir}: no such workdir; pass the --workdir of a finished training run")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"{workdir}: no {CONFIG_FILE}, so not a training run's workdir; {_train_hint(workdir)}")
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({e}); train again to rewrite it") from None
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict) or "data_dir" not in run:
        raise ExportError(f"{path}: expected {{\"config\": ..., \"data_dir\": ...}} as training writes it; "
                          "train again to rewrite it")
    return run


def _train_hint(workdir: str) -> str:
    return f"train first with `python -m din_jax.main --config configs/default.py --workdir {workdir}`"


def _embedding_encoder(host: Any, extra: Mapping[str, np.ndarray], tokens: Mapping[str, list[str | None]],
                       config: Any, checkpoint: str) -> EmbeddingEncoder:
    """The encoder of a model with embedding kinds: the training mappings (host, a HostEmbeddings) with the
    state the checkpoint saved beside the train state (`extra`), rebuilt from what the export writes."""
    from din_jax.host_embeddings import RAW_ID_KINDS

    saved = {key.split("/")[1] for key in extra if key.startswith("embedding/")}
    # Dense and multi-hash mappings hold no state that maps ids (only which rows training touched).
    lacking = [table.removesuffix("_table") for table, m in host.mappings.items()
               if table not in saved and not isinstance(m, (ev.DenseVocabulary, ev.MultiHash))]
    if lacking:
        raise ExportError(f"checkpoint {checkpoint} holds no id -> row map of embedding {', '.join(lacking)} "
                          f"({', '.join(host.mappings[f + '_table'].kind for f in lacking)}): no token would find "
                          "its row. Export a checkpoint saved with its embeddings' state (train again with this "
                          "din_jax, which saves it)")
    try:
        host.load_state_dict(extra)
    except ValueError as e:
        raise ExportError(f"checkpoint {checkpoint}: {_first(e)}") from None
    features = {}
    for table, mapping in host.mappings.items():
        feature = table.removesuffix("_table")
        keys = RAW_KEYS if mapping.kind in RAW_ID_KINDS else VOCABULARY_KEYS  # as load_data keys training's ids
        features[feature] = {"kind": mapping.kind, "keys": keys, "options": _mapping_options(mapping, config)}
    vocabulary_keyed = {f: tokens[f] for f, entry in features.items() if entry["keys"] == VOCABULARY_KEYS}
    encoder = EmbeddingEncoder(features, vocabulary_keyed, host.state_dict())  # as load_model rebuilds it
    for feature, mapping in encoder.mappings.items():
        trained = host.mappings[f"{feature}_table"]
        if type(mapping) is not type(trained) or mapping.num_rows != trained.num_rows:
            raise ExportError(f"embedding {feature!r}: the exported options rebuild a {mapping.kind} mapping of "
                              f"{mapping.num_rows} rows, not the trained {trained.kind} one of {trained.num_rows}; "
                              "this is a bug in din_jax.export")
    return encoder


def _mapping_options(mapping: ev.IdMapping, config: Any) -> dict[str, Any]:
    """The keyword arguments of ev.create that rebuild `mapping` (as host_embeddings.create_mappings made it)."""
    if isinstance(mapping, ev.DenseVocabulary):
        return {"vocab_size": int(mapping.num_rows), "name": mapping.name}
    if isinstance(mapping, ev.MultiHash):
        return {"num_ids_or_buckets": int(mapping.num_ids), "dim": int(mapping.dim), "combiner": mapping.combiner,
                "hash_ids": bool(mapping.hash_ids), "name": mapping.name}
    if isinstance(mapping, ev.AdaptiveEmbedding):
        return {"capacity": int(mapping.capacity), "hash_bucket_size": int(mapping.hash_bucket_size),
                "dim": int(mapping.dim), "seed": int(mapping.seed), "promote_freq": int(mapping.promote_freq),
                "initializer": mapping.initializer, "name": mapping.name}
    if isinstance(mapping, ev.EmbeddingVariable):
        options = {"capacity": int(mapping.capacity), "dim": int(mapping.dim), "seed": int(mapping.seed),
                   "filter": mapping.filter, "filter_freq": int(mapping.filter_freq), "on_full": mapping.on_full,
                   "initializer": mapping.initializer, "name": mapping.name, "capacity_field": mapping.capacity_field}
        if mapping.filter == "cbf":  # sizes the filter's counters (part of the state); the mapping does not keep it
            options["cbf_false_positive"] = float(config.ev_cbf_false_positive)
        if isinstance(mapping, ev.DynamicDimension):
            options.update(block_size=int(mapping.block_size), thresholds=[float(t) for t in mapping.thresholds],
                           decay=float(mapping.decay))
        return options
    raise ExportError(f"embedding {mapping.name!r}: kind {mapping.kind!r} cannot be exported yet")


def _storable(x: Any) -> np.ndarray:
    """A leaf as variables.npz stores it: floating point as fp32 (npz has no bf16); the function casts back."""
    x = np.asarray(x)
    return x.astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _export_function(model: Any, dtypes: Any, stored: Any, max_seq_length: int,
                     inputs: Mapping[str, tuple[str, tuple[str, ...]]] = INPUTS) -> jax_export.Exported:
    """DIN's inference as a jax.export function of (stored variables, batch), B symbolic and T fixed.

    `stored` are the variables as variables.npz holds them; the function casts them to `dtypes`, the
    model's own, first. `inputs`: the batch's columns (INPUTS plus the encoder's).
    """

    def infer(stored, batch):
        logits, weights = model.apply(jax.tree.map(lambda x, d: x.astype(d), stored, dtypes), batch)
        return jax.nn.sigmoid(logits), weights.astype(jnp.float32)

    (b,) = jax_export.symbolic_shape("B")
    dims = {"B": b, "T": max_seq_length}
    batch = {name: jax.ShapeDtypeStruct(tuple(dims[d] for d in shape), dtype)
             for name, (dtype, shape) in inputs.items()}
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stored)
    return jax_export.export(jax.jit(infer), platforms=PLATFORMS)(specs, batch)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> {'a/b/c': array}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextlib.contextmanager
def _atomic_directory(path: str) -> Iterator[str]:
    """Yields a temporary directory beside `path`; on success it is synced and renamed to `path`.

    An existing `path` is moved aside first and deleted after the rename; on an error only the
    temporary directory is removed, so `path` is never left half written.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise ExportError(f"cannot write in {parent} ({e.strerror}); choose a writable --out") from None
    old = None
    try:
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(path):
            os.replace(os.path.join(old, "previous"), path)  # put the previous export back
            os.rmdir(old)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Command line


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad or missing flag is one line on stderr, exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {_one_line(e)}; see --help", file=sys.stderr)
        sys.exit(2)


def run_command(argv: list[str], command: Any, errors: tuple[type[Exception], ...]) -> Any:
    """Runs command(); an error of `errors` prints `error: ...` as one line and exits 1 (no traceback)."""
    logging.set_verbosity(logging.WARNING)  # no INFO lines from jax's backend probing or orbax
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}; see --help", file=sys.stderr)
        sys.exit(2)
    try:
        return command()
    except errors as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The finished training run to export (its config.json and checkpoints).")
    flags.DEFINE_string("out", None, "The directory to write the exported model to.")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    out = run_command(argv, lambda: export_model(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.overwrite),
                      (ExportError,))
    print(f"exported {flags.FLAGS.workdir} to {out}")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
