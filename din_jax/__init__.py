"""din_jax: the Deep Interest Network CTR model in JAX/Flax, with DeepRec's DIN as the reference."""
