"""The T2V-Turbo-v2 method on top of turbo_kernels: schedule, models, data, training, sampling, CLI."""

__version__ = "0.1.0"
