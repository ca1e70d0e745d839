"""DiffInject: unsupervised dataset debiasing by diffusion h-space content injection."""

__version__ = "0.1.0"
