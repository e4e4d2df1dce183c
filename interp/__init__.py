"""lmmscope's first stage: models, layers, hooks and the activation cache."""

__version__ = "0.1.0"
