"""The one "refuse to resume with other settings" check.

Every resumable stage records what makes its output what it is (its identity: the settings, the
input's fingerprint) next to the partial output, and compares it with the identity of the run
that wants to continue. A difference means the two runs would produce different data, which
must never be appended to one another: the run stops with one line that names every differing
setting, as recorded and as asked now, and says what to do instead.

Users: the activation cache (parts manifest and finished file), SAE training (the checkpoint),
organism training (the checkpoint), steering sweeps (identity.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class IdentityError(ValueError):
    """A resume whose settings differ from the ones the partial output was made with."""


def normalised(identity: Any) -> Any:
    """The identity as it reads back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def differences(recorded: Any, now: Any, prefix: str = "") -> list[str]:
    """'key: recorded X, now Y' for every differing leaf (nested dicts give dotted keys)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(recorded) | set(now), key=str):
            out += differences(recorded.get(k), now.get(k), f"{prefix}{k}.")
        return out
    if recorded == now:
        return []
    return [f"{prefix.rstrip('.') or 'identity'}: recorded {recorded!r}, now {now!r}"]


def check_identity(recorded: Any, now: Any, what: str, fix: str) -> None:
    """Raise IdentityError unless `recorded` equals `now` (after a JSON round trip).

    `what` names the partial output ("checkpoint runs/x/train/checkpoint"), `fix` what to do."""
    diff = differences(normalised(recorded), normalised(now))
    if diff:
        raise IdentityError(f"{what} was made with other settings ({'; '.join(diff)}): {fix}")


def ensure_identity(path: str | Path, now: Any, what: str, fix: str) -> None:
    """Check `now` against the identity recorded at `path`, or record it there when there is none."""
    path = Path(path)
    if path.exists():
        check_identity(json.loads(path.read_text()), now, what, fix)
    else:
        from interp.infra.durable import write_json

        write_json(path, normalised(now), indent=1, sort_keys=True)
