"""Everything between files on disk and a numpy batch: preparation, encoding, batching.

Nothing here imports jax or flax; `din_jax` never parses text.
"""
