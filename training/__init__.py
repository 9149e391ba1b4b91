"""Training: objectives, recipes and checkpoints for every track of the flywheel."""
