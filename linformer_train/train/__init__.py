"""Training: DeepSpeed config derivation, the Trainer loop, atomic checkpoints, metrics."""
