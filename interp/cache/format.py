"""The on-disk schema of an activation cache, shared by its writer and its reader.

One HDF5 file:
  /activations  [N, d] float16|float32   one row per kept token
  /tokens       [N] TOKEN_DTYPE          where each row came from (sample, position, role, patch, pixel box)
  /samples      [S] SAMPLE_DTYPE         one row per input: image reference and hash, prompt, its row range
  attrs                                  format, model, layer, dtype, processor, data fingerprint, versions, seed
"""

from __future__ import annotations

import h5py
import numpy as np

FORMAT = "lmmscope.activations/1"
STR = h5py.string_dtype("utf-8")
SAMPLE_DTYPE = np.dtype([
    ("sample", "i8"), ("image_ref", STR), ("image_hash", STR), ("prompt", STR),
    ("width", "i4"), ("height", "i4"), ("n_tokens", "i4"), ("row_start", "i8"), ("n_rows", "i8"),
])  # fmt: skip
# Attributes whose JSON must match for a resumed run to append to the same cache.
IDENTITY_ATTRS = ("model", "revision", "layer", "site", "module_path", "dtype", "roles", "data", "prompt_template", "seed")


def empty_samples(n: int) -> np.ndarray:
    """A sample table of `n` rows with empty strings (np.zeros would leave the strings as 0)."""
    out = np.zeros(n, SAMPLE_DTYPE)
    for name in ("image_ref", "image_hash", "prompt"):
        out[name] = ""
    return out
