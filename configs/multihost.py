"""The seed's distributed training: DeepRec's Books setup with 512 examples per process and periodic checkpoints.

Name the process count after a colon, so that config.batch_size is the global batch (512 per process):
  python -m launch.local --num_processes 2 -- --config configs/multihost.py:2 --workdir runs/mh
A process lost mid-run stops the others; rerunning the same command resumes from the last checkpoint.
"""

from configs import books


def get_config(processes: str = "1"):
    """configs/books.py with batch_size = 512 x processes, a checkpoint every 1000 steps, plain logs."""
    config = books.get_config()
    config.batch_size = 512 * int(processes)
    config.save_steps = 1000
    config.progress_bar = False  # one line per log interval instead of a redrawn bar in every process's log
    return config
