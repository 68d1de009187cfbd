"""Checkpoints: save/resume with megatron-core dist_checkpointing."""
