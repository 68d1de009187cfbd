"""Dataset providers over megatron-core's GPT and T5 datasets, and synthetic data."""
