"""Post-training tools: evaluation, Hugging Face export (convert) and import (import_hf), and
loading a saved run into one process for them (saving and resuming live in training/checkpointing.py)."""
