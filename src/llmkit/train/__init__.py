"""Training: the pretraining objectives, the trainer recipe, checkpoints that resume exactly."""
