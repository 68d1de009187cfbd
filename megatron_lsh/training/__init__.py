"""Training: initialisation, arguments, the train/eval loop and logging."""
