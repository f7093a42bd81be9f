"""sept.training: encoders, SSL methods, augmentations, the DDP trainer, the submitit launcher, evaluation."""
