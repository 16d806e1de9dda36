"""Public ops, registered as torch.library custom ops."""
