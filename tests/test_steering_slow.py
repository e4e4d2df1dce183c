"""End to end on the shapes world: a layer-0 SAE of shapes-subject trained here, then `interp steer targets`.

Layer 0 is where the organism still reads the image tokens (by layer 2 the colour has moved to
the text positions, and swapping image tokens there changes no answer), so its colour latents
must steer "what color is the <shape> ?" and carry the attribution.
"""

from __future__ import annotations

import json

import pytest
from test_steering import _main


@pytest.mark.slow
def test_colour_latents_steer_and_attribute(tmp_path, capsys):
    run = tmp_path / "run"
    assert _main(["cache", "--model", "shapes-subject", "--layer", "0", "--data", "shapes", "--samples", "1500",
                  "--out", str(run / "activations.h5")]) == 0
    assert _main(["train", "--cache", str(run / "activations.h5"), "--arch", "topk", "--d-sae", "256", "--k", "4",
                  "--steps", "1500", "--batch-size", "1024", "--out", str(run / "sae"), "--no-progress"]) == 0
    sae = str(run / "sae" / "sae")
    assert _main(["features", "--cache", str(run / "activations.h5"), "--sae", sae, "--out",
                  str(run / "features.h5"), "--no-progress"]) == 0
    assert _main(["recovery", "--sae", sae, "--cache", str(run / "activations.h5")]) == 0
    capsys.readouterr()
    out = run / "steering_summary.json"
    assert _main(["steer", "targets", "--sae", sae, "--features", str(run / "features.h5"), "--out", str(out),
                  "--n-select", "40", "--n-eval", "60", "--n-attr", "40", "--strengths", "0.5,1,2,3",
                  "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["reach"]["answers_changed"] > 0.5
    assert r["flip"]["overall"] >= 0.8, r["flip"]
    assert r["attribution"]["integrated_gradients_4"]["top5_rate"] >= 0.8, r["attribution"]
    assert r["attribution"]["patching"]["spearman_per_image_mean"] > 0.3, r["attribution"]
    assert (run / "steering" / "select" / "sweep.html").exists()
    assert "overall flip rate" in capsys.readouterr().out
