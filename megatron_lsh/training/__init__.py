"""Training: flags and the config they make, initialisation, the train/eval loop, task base and
losses, metrics and logging, the optimizer, and save/resume (checkpointing.py)."""
