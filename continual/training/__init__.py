"""Training on one task: the Lightning modules, the Trainer factory, how each sequence method trains,
plain batched evaluation and the gradient-free weight search."""
