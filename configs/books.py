"""DeepRec's benchmark setup on prepared Amazon Books data (python -m input_pipeline.amazon ...).

Run: python -m din_jax.main --config configs/books.py --config.data_dir=data/books --workdir runs/books
"""

from configs import default


def get_config():
    """The default model and training flags on a prepared DIEN directory: batch 512, one epoch."""
    config = default.get_config()
    config.dataset = "dien"
    config.data_dir = "data/books"
    config.batch_size = 512
    config.steps = 0
    config.log_every_steps = 200
    return config
