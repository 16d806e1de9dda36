"""Reward models and the batched reward mixture of T2V-Turbo-v2 (SPEC 5)."""
