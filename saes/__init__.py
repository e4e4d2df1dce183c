"""lmmscope: the saes stage. Sparse autoencoders trained on cached activations, in SAELens's format.

    from saes import SAE, SAEConfig, TrainConfig, TensorSource
    from saes.train import train

Modules: `sae` (the model, save/load), `architectures` (the registry: one module per architecture
with its activation, loss, dead-feature handling and SAELens mapping), `kernels` (k-sparse TopK
autograd), `train` (the trainer and `interp train`), `data` (BatchSource, TensorSource, synthetic
data), `evaluate` (`interp eval`), `recovery` (`interp recovery`), `bench` (`interp bench train`).
Names are imported lazily so `interp --help` stays fast.
"""

_EXPORTS = {
    "SAE": "saes.sae", "SAEConfig": "saes.sae",
    "TrainConfig": "saes.train", "Trainer": "saes.train", "TrainResult": "saes.train",
    "BatchSource": "saes.data", "TensorSource": "saes.data", "synthetic_activations": "saes.data",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saes' has no attribute {name!r}")
