"""MiniMind's shared package: the model, its configuration, datasets and the training engine."""
