"""The training wing: the CrabNet model, its optimiser pieces, the training loop and its recipes, checkpoints
and cost estimates."""
