"""The embedded default: built-in Amazon-like synthetic data, DeepRec's DIN, a few minutes on 2 cores.

Every seed flag of DeepRec's DIN train.py that din_jax covers is a field here with the seed's name;
override any field on the command line as --config.field=value.
"""

import dataclasses

import ml_collections

from input_pipeline.synthetic import SyntheticSpec


def get_config() -> ml_collections.ConfigDict:
    """All knobs and their defaults in one place."""
    config = ml_collections.ConfigDict()

    # --- data -------------------------------------------------------------------------------------
    # 'synthetic': generate Amazon-like raw files and prepare them with the DIEN preparation;
    # 'dien': read a prepared DIEN directory (local_{train,test}_splitByUser + uid/mid/cat_voc).
    config.dataset = "synthetic"
    config.data_dir = ""            # seed --data_location; '' with 'synthetic' -> WORKDIR/data
    config.synthetic = ml_collections.ConfigDict(dataclasses.asdict(SyntheticSpec()))  # sizes and shape
    config.synthetic.seed = 0
    config.prepare_seed = 3         # seed of the DIEN preparation (negative sampling, train/test split)
    config.max_seq_length = 50      # DeepRec truncates histories to 50 entries
    config.history_keep = "auto"    # 'first' (oldest 50, DeepRec) or 'last' (newest 50); 'auto': the data's
    # default, 'first' for DIEN sample files and 'last' for every-event data (input_pipeline.events)
    # Length bucketing: batches grouped by history length and padded to the first boundary that fits
    # (masked padding: same math per example, less work). () pads every batch to max_seq_length.
    config.bucket_boundaries = ()
    # History packing: only real history positions reach the device, padded to a multiple of this
    # (a few shapes); batches stay as sampled. 0 = pad every history to max_seq_length.
    config.pack_granularity = 1024

    # --- model ------------------------------------------------------------------------------------
    config.model = ml_collections.ConfigDict(dict(
        embedding_dim=18,
        attention_hidden=(80, 40),
        mlp_hidden=(200, 80),
        mlp_out=2,
        batch_norm="frozen",        # DeepRec parity; 'batch' = batch statistics; 'none'
        activation="relu",          # 'relu' (DeepRec) or 'dice'
        attention="softmax",        # softmax (DeepRec) | unnormalized (DIN paper) | mean | none (sum pooling)
    ))

    # --- training (seed flags) --------------------------------------------------------------------
    config.batch_size = 512         # seed README: 512
    config.eval_batch_size = 2048   # evaluation only; does not change any metric
    config.steps = 0                # 0 = one epoch, as in the seed
    config.no_eval = False
    config.seed = 2021
    config.learning_rate = 0.001
    # adam: TF1 Adam, every table row decays and moves every step as in DeepRec's DIN (exact, at the cost of the
    # touched rows) | lazyadam: TF's LazyAdam (untouched rows keep their moments) | adamasync | adagrad | adagraddecay
    config.optimizer = "adam"
    config.adagrad_decay_step = 100_000   # adagraddecay: accumulator_decay_step
    config.adagrad_decay_rate = 0.9       # adagraddecay: accumulator_decay_rate
    config.clip_norm = 5.0          # per-tensor tf.clip_by_norm, as DeepRec's DIN
    config.sparse_embeddings = True # update only the embedding rows a step touches (False: whole tables)
    # Split each embedding table's rows (and their optimizer slots) over the devices of the run, each lookup
    # routed to its row's owner with all-to-all, so a table larger than one device's memory trains and a
    # device's traffic does not grow with the device count (seed --input_layer_partitioner; din_jax/sharded_tables.py).
    config.shard_embeddings = False
    config.shard_min_rows = 10_000  # smaller tables (categories) stay replicated under shard_embeddings
    config.micro_batch = 0          # seed --micro_batch: accumulate gradients over N slices of a batch (0/1 off)
    # Seed --workqueue: units of each epoch (one batch shard each) go to whichever process asks first, so a
    # slow reader trains fewer; every example still once per epoch. A process whose next batch is not ready
    # within workqueue_wait_ms contributes an empty share to that step instead of holding the others up.
    config.workqueue = False
    config.workqueue_wait_ms = 100
    config.smartstaged = True       # seed --smartstaged: prepare and transfer next batches in a background thread
    config.prefetch_depth = 2       # batches kept ready by that thread
    config.precision = "fp32"       # seed --bf16: fp32 | mixed_bf16 (bf16 compute, fp32 weights) | bf16
    config.checkpoint_dir = ""      # seed --checkpoint; '' -> WORKDIR/checkpoints
    config.save_steps = 0           # periodic checkpoints every N steps, 0 = only the final one
    config.keep_checkpoint_max = 1
    config.intra = 0                # seed --intra: CPU cores (XLA:CPU's intra-op threads) per process, 0 = all
    config.timeline = 0             # profile N steps with jax.profiler (TensorBoard / Perfetto trace)

    # --- DeepRec's embedding features (seed flags; din_jax/ev.py, din_jax/host_embeddings.py) ---------------
    config.ev = False               # seed --ev: every feature an EmbeddingVariable keyed by raw ids (no vocabulary)
    config.ev_capacity = 0          # rows per EmbeddingVariable table; 0 = the data's distinct ids of that feature
    config.ev_filter = ""           # seed --ev_filter: '' | 'counter' | 'cbf' (own row after ev_filter_freq lookups)
    config.ev_filter_freq = 3
    config.ev_cbf_false_positive = 0.01
    config.ev_elimination = ""      # seed --ev_elimination, applied at each checkpoint save: '' | 'gstep' | 'l2'
    config.ev_steps_to_live = 4000  # gstep: drop ids not looked up in training for more steps than this
    config.ev_l2_threshold = 1.0    # l2: drop ids whose 0.5 * |row|^2 is below this (DeepRec's L2 weight)
    config.adaptive_emb = False     # seed --adaptive_emb (user feature): frequent ids own rows, rare ids share buckets
    config.adaptive_hash_bucket_size = 100_000
    config.adaptive_promote_freq = 3
    config.multihash = False        # seed --multihash: quotient-remainder rows of two ~sqrt(N)-row tables
    config.multihash_combiner = "add"  # 'add' | 'mul' | 'concat'
    config.dynamic_ev = False       # seed --dynamic_ev: dimension blocks grow with an id's decayed frequency
    config.dynamic_block_size = 6   # 18 = 3 blocks of 6
    config.dynamic_thresholds = (5.0, 20.0)  # frequency at which an id gets its 2nd, 3rd block
    config.dynamic_decay = 0.999    # per-step decay of the frequency
    # Per feature: '' (follow the flags above) | 'dense' | 'ev' | 'adaptive' | 'multihash' | 'dynamic'.
    config.embeddings = ml_collections.ConfigDict(dict(uid="", mid="", cat=""))
    config.incremental_ckpt = 0.0   # seed --incremental_ckpt: seconds between changed-rows checkpoints (0 = off)

    # --- reporting --------------------------------------------------------------------------------
    config.log_every_steps = 50
    config.eval_every_steps = 0     # 0 = evaluate once at the end
    config.progress_bar = True
    return config
