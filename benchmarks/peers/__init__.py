"""The DIN of din_jax ported to peer frameworks (PyTorch, TensorFlow 2) for benchmarks/train_throughput.py."""
