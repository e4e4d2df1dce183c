"""steering.methods: the reference method's edit (LMMs-Lab Multimodal-SAE: pre-activation clamp in the prefill,
top-k re-applied, the model run on the SAE's reconstruction) against ours (post-activation edit, error term
kept), and steering_methods end to end on a random-init subject v2 with a random SAE at layer 4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.infra.layout import RunLayout
from saes.sae import SAE, SAEConfig
from steering.interventions import FeatureEdit, Intervention, InterventionError, sparsify

MIDDLE = "model.language_model.layers.4"


def small_sae(arch: str = "topk", d_in: int = 16, d_sae: int = 12, k: int = 4) -> SAE:
    torch.manual_seed(0)
    return SAE(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k)).eval()


def masks_with_padding() -> dict[str, torch.Tensor]:
    """Two prompts of 5 tokens, the first left-padded by one; image tokens 1..2."""
    every = torch.ones(2, 5, dtype=torch.bool)
    every[0, 0] = False
    image = torch.zeros(2, 5, dtype=torch.bool)
    image[:, 1:3] = True
    return {"image": image, "text": every & ~image, "all": every}


def activations_of(sae: SAE, recon: torch.Tensor) -> torch.Tensor:
    """The activations a reconstruction decodes from (W_dec has full row rank for d_sae < d_in)."""
    return torch.linalg.lstsq(sae.W_dec.t(), (recon - sae.b_dec).t()).solution.t()


def reference(feature: int, value: float) -> list[Intervention]:
    return [Intervention(feature, "clamp-pre", value, positions="prompt")]


def test_reference_edit_clamps_the_prefill_and_only_splices_generated_tokens():
    sae, masks = small_sae(), masks_with_padding()
    torch.manual_seed(1)
    out = torch.randn(2, 5, 16) * 3
    f = 5
    with torch.no_grad():
        edit = FeatureEdit(sae, reference(f, 50.0), masks, keep_error=False, splice=True)
        new = edit(out, 0)
        every = masks["all"]
        assert torch.equal(new[~every], out[~every])  # padding: untouched
        acts = activations_of(sae, new[every])
        assert torch.allclose(acts[:, f], torch.full((len(acts),), 50.0), atol=1e-3)  # clamped at every prompt token
        assert ((acts.abs() > 1e-3).sum(-1) <= 4).all()  # and top-k re-applied: at most k features active
        # generated tokens: the model still runs on the SAE's reconstruction, but nothing is clamped there
        step = torch.randn(2, 1, 16) * 3
        spliced = edit(step, 1)
        assert torch.allclose(spliced, sae(step), atol=1e-5)
        assert (activations_of(sae, spliced[:, 0])[:, f] - 50.0).abs().min() > 1.0
        # without the splice the generated tokens are not touched at all; the prefill still is
        alone = FeatureEdit(sae, reference(f, 50.0), masks)
        assert alone(step, 1) is step
        assert not torch.equal(alone(out, 0)[every], out[every])


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_top_k_is_re_applied_after_the_pre_activation_clamp(arch):
    sae = small_sae(arch, d_sae=32)  # batchtopk at inference: threshold 0, i.e. every positive pre-activation
    torch.manual_seed(2)
    x = torch.randn(40, 16) * 3
    with torch.no_grad():
        if arch == "batchtopk":
            assert ((sae.encode(x) > 0).sum(-1) > 4).any()  # the threshold alone keeps more than k
        else:
            assert torch.equal(sparsify(sae, sae.raw_pre_acts(x)), sae.encode(x))  # unedited: encode exactly
        pre = sae.raw_pre_acts(x)
        pre[:, 7] = 1e3
        acts = sparsify(sae, pre)
        assert ((acts > 0).sum(-1) <= 4).all() and torch.equal(acts[:, 7], torch.full((40,), 1e3))
        pre[:, 7] = -1.0  # a value below every kept one: the feature is off
        assert (sparsify(sae, pre)[:, 7] == 0).all()


def test_a_zero_change_is_bit_identical_for_ours_and_not_for_the_reference():
    sae, masks = small_sae(d_sae=32), masks_with_padding()  # 9 rows x k 4 leave some of 32 features unused
    torch.manual_seed(3)
    out = torch.randn(2, 5, 16) * 3
    with torch.no_grad():
        acts = sae.encode(out[masks["all"]])
        silent = int(np.flatnonzero((acts == 0).all(0).numpy())[0])  # a feature no row uses
        for ivs in ([Intervention(3, "add", 0.0, positions="image")],
                    [Intervention(silent, "clamp-pre", 0.0, positions="prompt")]):  # clamps a 0 to 0
            assert torch.equal(FeatureEdit(sae, ivs, masks)(out, 0), out)
        ref = FeatureEdit(sae, reference(silent, 0.0), masks, keep_error=False, splice=True)(out, 0)
        assert not torch.equal(ref, out)  # the reference drops the SAE's error term ...
        assert torch.allclose(ref[masks["all"]], sae(out[masks["all"]]), atol=1e-5)  # ... for its reconstruction
    with pytest.raises(InterventionError, match="clamp, add, ablate, clamp-pre"):
        Intervention.parse("1:clamp-before:1")


# ---------------------------------------------------------------- on the model


@pytest.fixture(scope="module")
def lm(subject_path):
    from interp.model.models import load_model

    return load_model(str(subject_path), device="cpu")


def world_queries(task: str, n: int):
    from interp.shapes.organisms.eval import world_items
    from steering.steer import Query

    return [Query(qa.question, scene.render(), f"shapes:test:{scene.index}:0") for scene, qa in world_items(task, n)]


def test_on_the_model_the_reference_moves_even_a_zero_change(lm, subject_path, tmp_path):
    from steering.steer import generate, prepare, setup_for

    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=128, d_sae=64, k=4, model_name=str(subject_path), hook_name=MIDDLE,
                        hook_layer=4)).eval()
    setup = setup_for(lm, sae, tmp_path)
    batch = prepare(lm, world_queries("color", 3))
    base = generate(setup, batch, max_new_tokens=3, engine="torch")
    ours = generate(setup, batch, [Intervention(0, "add", 0.0, positions="all")], max_new_tokens=3, engine="torch")
    assert torch.equal(ours.sequences, base.sequences) and torch.equal(ours.first_logits, base.first_logits)
    ref = generate(setup, batch, [Intervention(0, "clamp-pre", 0.0, positions="prompt")], max_new_tokens=3,
                   engine="torch", keep_error=False, splice=True)
    assert (ref.first_logits - base.first_logits).abs().max() > 1e-3


def test_collateral_questions_are_about_the_same_images():
    from steering.methods import answered
    from steering.sweep import SpecError, SweepSpec, WorldItems, items_for

    spec = lambda w: SweepSpec(features=[0], world=w, unit="absolute")  # noqa: E731
    colour = items_for(spec(WorldItems("color", 6)))
    size = items_for(spec(WorldItems("size", 6, scenes_of="color")))
    assert [it.query.image_ref for it in size] == [it.query.image_ref for it in colour]  # every colour image has one
    assert all(it.query.prompt.startswith("what size is the ") and it.truth in ("small", "large") for it in size)
    assert size[0].key == items_for(spec(WorldItems("size", 6, scenes_of="color")))[0].key  # the same each call
    with pytest.raises(SpecError, match="unknown world scenes_of 'colour'"):
        WorldItems("size", 6, scenes_of="colour")
    # "what is at P ?" counts as right when everything but the steered kind's word is
    assert answered("small striped blue circle", "small striped red circle", "at", "color")
    assert not answered("large striped blue circle", "small striped red circle", "at", "color")
    assert not answered("small striped blue circle", "small striped red circle", "at", "shape")
    assert answered("large blue letter k", "large blue letter e", "at", "shape")
    assert not answered("small", "large", "size", "color")


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A layer-4 cache of the shipped subject (12 samples: its answers are valid ones, which the strength
    selection needs), a random TopK SAE, its features.h5, and a recovery report naming three live features
    for red, green and blue, and blue's also for cyan (shared)."""
    from explain.features import FeaturesConfig, compute_features
    from explain.feature_reader import FeatureReader
    from interp.cache.writer import CacheConfig, build_cache
    from interp.shapes.concepts import ConceptMatch, RecoveryReport, write_recovery
    from saes.sae import sae_fingerprint

    run = tmp_path_factory.mktemp("methods") / "run"
    layout = RunLayout(run)
    build_cache(CacheConfig(run=str(run), layer="4", samples=12, batch_size=12))
    torch.manual_seed(0)
    SAE(SAEConfig(arch="topk", d_in=128, d_sae=64, k=4, model_name="shapes-subject", hook_name=MIDDLE,
                  hook_layer=4)).save(layout.sae)
    compute_features(FeaturesConfig(run=str(run), progress=False))
    with FeatureReader(layout.features) as stats:
        live = np.flatnonzero(stats.summary_table()["max"] > 0)[:3].tolist()
    m = lambda c, f, f1: ConceptMatch(c, f, 0.1, f1, 1.0, 1.0, 1.0, 10, 0.5)  # noqa: E731
    report = RecoveryReport([m("color:red", live[0], 0.9), m("color:green", live[1], 0.8),
                             m("color:blue", live[2], 0.7), m("color:cyan", live[2], 0.5)],
                            extra={"sae_sha256": sae_fingerprint(layout.sae)})
    write_recovery(report, layout.recovery)
    return run


def test_steering_methods_end_to_end_and_no_edit_no_collateral(random_run):
    """At strength 0 "add" changes nothing: no answer changes (its flips are the unsteered model's own errors),
    collateral exactly 0, KL 0; the reference still moves the model (it runs on the SAE's reconstruction)."""
    import json

    from steering.methods import VARIANTS, steering_methods

    r = steering_methods(random_run, n_questions=4, strengths=(0.0,))
    add = r["variants"]["add-image"]
    assert add["collateral"] == add["collateral_accuracy_drop"] == 0.0
    assert all(v["changed"] == 0.0 for v in add["per_kind"]["color"]["per_concept"].values())
    assert add["collateral_kl"] < 1e-6 and add["collateral_n"] > 0 and add["coherence"] is not None
    assert r["reference"]["method"]["mode"] == "clamp-pre" and r["reference"]["method"]["splice"]
    select = json.loads(RunLayout(random_run).sweep("methods-select-color-reference").summary.read_text())
    assert min(row["kl"] for row in select["rows"]) > 1e-3  # a random SAE's reconstruction: answers move
    assert set(r["variants"]) == set(VARIANTS) and r["ours"]["variant"]["color"] in VARIANTS
    chosen = r["variants"][r["ours"]["variant"]["color"]]
    assert r["ours"]["flip_rate"] == chosen["flip_rate"] and r["ours"]["collateral"] == chosen["collateral"]
    per = add["per_kind"]["color"]
    assert set(per["per_concept"]) == {"color:red", "color:green", "color:blue", "color:cyan"}
    assert set(per["collateral_by_task"]) == {"size", "fill", "where", "count", "at"}
    steering = RunLayout(random_run).root / "steering"
    assert {p.name for p in steering.iterdir()} >= {"methods-select-color-reference", "methods-test-color-add-image",
                                                    "methods-collateral-color-at-clamp-all-2"}
    assert all(p.name.startswith("methods-") for p in steering.iterdir())
    assert not (steering / "methods-test-color-add-image" / "sweep.html").exists()
    assert set(r["target"]) == {"flip_rate>=reference", "collateral<=reference/2", "met", "per_kind"}
    assert set(r["reference_variants"]) == {"reference-error-kept"}


def test_steering_methods_bad_input(tmp_path, random_run):
    from steering.methods import steering_methods

    with pytest.raises(ValueError, match="unknown kinds \\['size'\\]"):
        steering_methods(random_run, kinds=("size",))
    with pytest.raises(ValueError, match="n_questions must be an integer of at least 2"):
        steering_methods(random_run, n_questions=1)
    empty = tmp_path / "empty"
    with pytest.raises(ValueError, match="interp features"):
        steering_methods(empty)
