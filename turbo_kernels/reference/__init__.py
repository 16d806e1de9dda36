"""Plain PyTorch references: the meaning of every op."""
