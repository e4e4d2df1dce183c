"""The on-disk schema of an activation cache, shared by its writer, its reader and the token map.

One HDF5 file (docs/formats.md, "Activation cache", is the normative spec):
  /activations  [N, d] float16|float32   one row per kept token
  /tokens       [N] TOKEN_DTYPE          where each row came from (sample, position, role, patch, pixel box)
  /samples      [S] SAMPLE_DTYPE         one row per sample: image reference and hash, prompt, its row range
  attrs                                  format, model, layer, dtype, processor, data fingerprint, versions, seed

Vocabulary: a *sample* is one row of the samples table (one input: an image and a prompt, or a
prompt alone); `sample` in the token table is that row's index. `source_index` is the sample's
number in its data source (what its `image_ref` encodes). Token *roles* are stored as codes into
ROLES; code them and test them only through the functions below.
"""

from __future__ import annotations

import h5py
import numpy as np

FORMAT = "lmmscope.activations/3"
READABLE_FORMATS = (FORMAT, "lmmscope.activations/2")
"""Formats the reader opens: a /2 file is a /3 file whose rows have no `answer` role."""
STR = h5py.string_dtype("utf-8")

ROLES = ("image_patch", "image_special", "text", "template", "special", "pad", "answer")
"""Token roles: a patch of an image, an image separator or marker, the user's text, chat-template
text, another special token, padding, the assistant's answer appended after the prompt (a data
source that gives answers: `shapes:SPLIT:qa`). New roles go at the end, so codes never change."""
IMAGE_ROLES = ("image_patch", "image_special")
TEXT_ROLES = ("text", "template", "answer")

TOKEN_DTYPE = np.dtype([
    ("sample", "i4"), ("position", "i4"), ("role", "u1"), ("image", "i2"), ("tile", "i2"), ("row", "i2"),
    ("col", "i2"), ("x0", "f4"), ("y0", "f4"), ("x1", "f4"), ("y1", "f4"), ("token_id", "i4"),
])  # fmt: skip
SAMPLE_DTYPE = np.dtype([
    ("source_index", "i8"), ("image_ref", STR), ("image_hash", STR), ("prompt", STR),
    ("width", "i4"), ("height", "i4"), ("n_tokens", "i4"), ("row_start", "i8"), ("n_rows", "i8"),
])  # fmt: skip
# Attributes whose JSON must match for a resumed run to append to the same cache.
IDENTITY_ATTRS = ("model", "revision", "layer", "site", "module_path", "dtype", "roles", "data", "prompt_template", "seed")


class RoleError(ValueError):
    """Role names that are not token roles."""


def role_code(name: str) -> int:
    if name not in ROLES:
        raise RoleError(f"unknown roles [{name!r}]; known: {list(ROLES)}")
    return ROLES.index(name)


def role_codes(names) -> list[int]:
    """The codes of role names, checked (the message lists the valid ones)."""
    unknown = sorted(set(names) - set(ROLES))
    if unknown:
        raise RoleError(f"unknown roles {unknown}; known: {list(ROLES)}")
    return [ROLES.index(n) for n in names]


def role_name(code: int) -> str:
    return ROLES[int(code)]


def has_role(roles, *names: str):
    """Elementwise: the role code is one of `names` (numpy arrays and torch tensors alike)."""
    codes = role_codes(names)
    out = roles == codes[0]
    for c in codes[1:]:
        out = out | (roles == c)
    return out


def is_image_patch(roles):
    return has_role(roles, "image_patch")


def is_image(roles):
    """Image patches and image separators/markers."""
    return has_role(roles, *IMAGE_ROLES)


def is_text(roles):
    """The user's text, chat-template text and answer text: every text token of the sample."""
    return has_role(roles, *TEXT_ROLES)


def is_user_text(roles):
    return has_role(roles, "text")


def is_answer(roles):
    return has_role(roles, "answer")


def is_pad(roles):
    return has_role(roles, "pad")


def empty_samples(n: int) -> np.ndarray:
    """A samples table of `n` rows with empty strings (np.zeros would leave the strings as 0)."""
    out = np.zeros(n, SAMPLE_DTYPE)
    for name in ("image_ref", "image_hash", "prompt"):
        out[name] = ""
    return out


def text(value) -> str:
    """An HDF5 string value as str (h5py gives bytes for variable-length strings)."""
    return value.decode() if isinstance(value, bytes) else str(value)
