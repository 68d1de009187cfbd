"""Tools that run on a finished checkpoint: evaluation, conversion and Hugging Face export, and
loading a saved run into one process for them (saving and resuming live in training/checkpointing.py)."""
