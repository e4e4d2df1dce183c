"""Steering and attribution on the shipped shapes-subject organism with a random SAE at layer 0
(the layer whose image tokens the answer still reads): exactness of the edit, both engines,
positions, batches, bad input, the sweep's records and resume, attribution against ablation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interp.infra.identity import IdentityError
from interp.infra.layout import RunLayout
from saes.sae import SAE, SAEConfig
from steering.attribution import ablation_effects, attribute, spearman
from steering.interventions import FeatureEdit, Intervention, InterventionError, resolve, sae_hook
from steering.steer import Query, generate, next_token_logits, prepare, setup_for, steer_one
from steering.sweep import SpecError, SweepSpec, run_sweep

LAYER0 = "model.language_model.layers.0"


def random_sae(d_in: int = 128, d_sae: int = 64, hook: str = LAYER0, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    return SAE(SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=4, model_name="shapes-subject", hook_name=hook,
                         hook_layer=int(hook.rsplit(".", 1)[1]))).eval()


@pytest.fixture(scope="module")
def lm():
    from interp.model.models import load_model

    return load_model("shapes-subject", device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory holding only an SAE (random, at layer 0): no features.h5, no recovery.json."""
    run = tmp_path_factory.mktemp("steer-run")
    random_sae().save(RunLayout(run).sae)
    return run


@pytest.fixture(scope="module")
def setup(lm, run):
    return setup_for(lm, SAE.load(RunLayout(run).sae).eval(), run)


@pytest.fixture(scope="module")
def batch(lm):
    from interp.shapes.organisms.eval import world_items

    items = world_items("color", 6, split="test")
    return prepare(lm, [Query(qa.question, scene.render(), f"shapes:test:{scene.index}:0") for scene, qa in items])


def feature_acts(setup, batch, where: str = "image") -> torch.Tensor:
    from interp.model.hooks import capture

    x = capture(setup.lm.model, batch.inputs, setup.hook.module_path, engine="torch")
    with torch.no_grad():
        return setup.sae.encode(x[batch.masks[where]])


def active_feature(setup, batch) -> int:
    """The feature most active on the batch's image tokens (so steering it does something)."""
    return int(feature_acts(setup, batch).sum(0).argmax())


# ---------------------------------------------------------------- the spec and bad input


def test_intervention_parse_and_validation():
    assert Intervention.parse("142:clamp:2:max:image") == Intervention(142, "clamp", 2.0, "max", "image")
    assert Intervention.parse("9:ablate") == Intervention(9, "ablate")
    assert Intervention.parse("3:add:-1.5:absolute:text").positions == "text"
    for bad, words in (("x:clamp", "FEATURE:MODE"), ("1:clamp:nan", "finite"), ("1:add:inf", "finite"),
                       ("1:clamp:abc", "not a number"), ("1:push:1", "clamp, add, ablate"),
                       ("1:clamp:1:percent", "absolute, max"), ("1:clamp:1:max:everywhere", "image, text, generated")):
        with pytest.raises(InterventionError, match=words):
            Intervention.parse(bad)
    with pytest.raises(InterventionError, match="finite"):
        Intervention(1, "clamp", float("-inf"))
    with pytest.raises(InterventionError, match="non-negative integer"):
        Intervention(-2)


def test_resolve_units_and_feature_range():
    maxima = np.array([0.0, 2.0, 4.0])
    ivs = [Intervention(1, "clamp", 1.5, "max"), Intervention(2, "add", 3.0), Intervention(0, "ablate", unit="max")]
    out = resolve(ivs, 3, maxima)
    assert [(iv.value, iv.unit) for iv in out] == [(3.0, "absolute"), (3.0, "absolute"), (0.0, "max")]
    with pytest.raises(InterventionError, match=r"feature 3 is out of range: .* 3 features \(valid indices 0..2\)"):
        resolve([Intervention(3)], 3, maxima)
    with pytest.raises(InterventionError, match="features.h5"):
        resolve([Intervention(1, "clamp", 1.0, "max")], 3, None)
    with pytest.raises(InterventionError, match="never fired"):
        resolve([Intervention(0, "clamp", 1.0, "max")], 3, maxima)


def test_sae_that_does_not_fit_the_model_is_named(lm):
    with pytest.raises(InterventionError, match=r"d_in=64 .*layers\.0 \(model\.language_model\.layers\.0\).*=128"):
        sae_hook(lm, random_sae(d_in=64))
    with pytest.raises(InterventionError, match="layers.9"):
        sae_hook(lm, random_sae(hook="model.language_model.layers.9"))
    with pytest.raises(InterventionError, match=r"trained on layers\.0 .* not on layers\.2"):
        sae_hook(lm, random_sae(), layer=2)
    assert sae_hook(lm, random_sae(), layer=0).module_path == LAYER0


# ---------------------------------------------------------------- the edit


def test_feature_edit_changes_exactly_the_targeted_latent():
    sae = random_sae(d_in=16, d_sae=12)
    torch.manual_seed(1)
    out = torch.randn(2, 5, 16) * 3
    image = torch.zeros(2, 5, dtype=torch.bool)
    image[:, 1:3] = True
    masks = {"image": image, "text": ~image, "all": torch.ones(2, 5, dtype=torch.bool)}
    with torch.no_grad():
        acts = sae.encode(out)
        f = int(acts[image].sum(0).argmax())
        new = FeatureEdit(sae, [Intervention(f, "clamp", 7.0)], masks)(out, 0)
        assert torch.equal(new[~image], out[~image])  # other positions: bit for bit
        target = acts.clone()
        target[..., f] = 7.0
        want = out + sae.decode(target) - sae.decode(acts)  # the error term is kept
        assert torch.allclose(new[image], want[image], atol=1e-5)
        # several features at once = their changes added (different features)
        g = (f + 1) % 12
        both = FeatureEdit(sae, [Intervention(f, "clamp", 7.0), Intervention(g, "add", -2.0, positions="all")], masks)
        target[..., g] = torch.where(image, target[..., g], acts[..., g]) - 2.0
        target[~image, f] = acts[~image, f]
        want = out + sae.decode(target) - sae.decode(acts)
        assert torch.allclose(both(out, 0), want, atol=1e-5)
        # without the error term, edited rows become the SAE's reconstruction
        spliced = FeatureEdit(sae, [Intervention(f, "ablate")], masks, keep_error=False)(out, 0)
        target = acts.clone()
        target[..., f] = 0
        assert torch.allclose(spliced[image], sae.decode(target)[image], atol=1e-5)
        # generation steps: only "generated" / "all" reach them; prompt kinds do not
        step = out[:, :1]
        assert FeatureEdit(sae, [Intervention(f, "add", 1.0)], masks)(step, 3) is step
        assert not torch.equal(FeatureEdit(sae, [Intervention(f, "add", 1.0, positions="generated")], masks)(step, 3),
                               step)
        assert torch.equal(FeatureEdit(sae, [Intervention(f, "add", 1.0, positions="generated")], masks)(out, 0), out)
        with pytest.raises(RuntimeError, match="use_cache"):
            FeatureEdit(sae, [Intervention(f)], masks)(out[:, :4], 0)


@pytest.mark.parametrize("engine", ["nnsight", "torch"])
def test_zero_change_is_the_unsteered_model(setup, batch, engine):
    base = generate(setup, batch, max_new_tokens=4)
    f = active_feature(setup, batch)
    silent = np.flatnonzero((feature_acts(setup, batch, "all") == 0).all(0).numpy())
    assert len(silent), "the random SAE should leave some features silent on 6 prompts"
    inactive = int(silent[0])  # ablating a feature that is zero everywhere changes nothing either
    for ivs in ([Intervention(f, "add", 0.0, positions="all")],
                [Intervention(f, "add", 0.0, positions="all"), Intervention(inactive, "ablate", positions="all")]):
        steered = generate(setup, batch, ivs, max_new_tokens=4, engine=engine)
        assert torch.equal(steered.sequences, base.sequences)
        assert torch.allclose(steered.first_logits, base.first_logits, atol=1e-6, rtol=0)
        assert steered.texts == base.texts


def test_engines_and_batching_agree(setup, batch, lm):
    f = active_feature(setup, batch)
    ivs = [Intervention(f, "clamp", 800.0, positions="image"), Intervention(f, "add", 200.0, positions="generated")]
    a = generate(setup, batch, ivs, max_new_tokens=4, engine="nnsight")
    b = generate(setup, batch, ivs, max_new_tokens=4, engine="torch")
    base = generate(setup, batch, max_new_tokens=4)
    assert torch.equal(a.sequences, b.sequences) and a.texts == b.texts
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5)
    assert (a.first_logits - base.first_logits).abs().max() > 1e-2  # it did steer
    one_by_one = [generate(setup, prepare(lm, [q]), ivs, max_new_tokens=4).texts[0] for q in batch.queries]
    assert one_by_one == a.texts


def test_positions_reach_what_they_name(setup, batch):
    f = active_feature(setup, batch)
    base = generate(setup, batch, max_new_tokens=4)
    gen_only = generate(setup, batch, [Intervention(f, "add", 500.0, positions="generated")], max_new_tokens=4)
    assert torch.allclose(gen_only.first_logits, base.first_logits, atol=1e-6)  # the first token comes from the prompt
    for where in ("image", "text", "all"):
        moved = generate(setup, batch, [Intervention(f, "add", 500.0, positions=where)], max_new_tokens=4)
        assert (moved.first_logits - base.first_logits).abs().max() > 1e-3, where


def test_steer_one_reports_side_by_side_and_top_changes(setup, batch):
    f = active_feature(setup, batch)
    r = steer_one(setup, batch.queries[0], [Intervention(f, "clamp", 1000.0)], top_k=5)
    assert len(r.changes) == 5 and abs(r.changes[0].delta) >= abs(r.changes[-1].delta)
    assert r.kl >= 0 and "baseline" in r.table() and r.baseline in r.table()
    assert json.loads(json.dumps(r.to_json()))["top_changes"][0]["token"] == r.changes[0].token


# ---------------------------------------------------------------- attribution


def test_attribution_keeps_the_forward_and_predicts_ablations(setup, batch):
    atts = attribute(setup, batch)
    clean = next_token_logits(setup, batch)
    rhos = []
    for i, a in enumerate(atts):
        assert a.metric == pytest.approx(float(clean[i, a.answer] - clean[i, a.baseline]), abs=1e-4)
        assert a.answer == int(clean[i].argmax()) and a.metric >= 0
        assert set(a.position.tolist()) <= set(batch.masks["image"][i].nonzero().flatten().tolist())
        assert np.allclose(a.total().sum(), a.score.sum(), atol=1e-5)
        pred, true = ablation_effects(setup, batch, i, a)
        assert len(pred) == len(a.active_features())
        rhos.append(spearman(pred, true))
    assert np.nanmean(rhos) > 0.6, rhos


def test_integrated_gradients_are_complete(setup, batch):
    """IG scores add up to what ablating every feature at those positions does to the metric."""
    from interp.model.hooks import patch_output

    atts = attribute(setup, batch, steps=16)
    mask = batch.masks["image"]

    def ablate_all(out):
        if out.shape[:2] != mask.shape:
            return out
        x = out[mask]
        return out.index_put((mask,), x - setup.sae.encode(x) @ setup.sae.W_dec)

    with torch.no_grad(), patch_output(setup.lm.model, setup.hook.module_path, ablate_all):
        logits = setup.lm.model(**batch.inputs).logits[:, -1]
    for i, a in enumerate(atts):
        drop = a.metric - float(logits[i, a.answer] - logits[i, a.baseline])
        assert a.score.sum() == pytest.approx(drop, abs=0.05 + 0.02 * abs(drop))


def test_spearman():
    assert spearman(np.arange(5), np.arange(5) ** 3) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3, 4], [1, 2.5, 2.5, 4])[0, 1])
    assert np.isnan(spearman([1, 2], [1, 2]))


# ---------------------------------------------------------------- the sweep


def test_spec_errors_name_the_valid_keys(tmp_path):
    with pytest.raises(SpecError, match=r"unknown key 'strenghts' in the sweep spec; valid keys: features, strengths"):
        SweepSpec.from_dict({"features": [1], "strenghts": [1], "prompts": ["a"]})
    with pytest.raises(SpecError, match=r"unknown key 'sae' in the sweep spec"):  # the run directory names the SAE
        SweepSpec.from_dict({"sae": "x", "features": [1], "prompts": ["a"]})
    with pytest.raises(SpecError, match=r"unknown key 'splt' in the spec's world; valid keys: task, n, split, seed"):
        SweepSpec.from_dict({"features": [1], "world": {"splt": "test"}, "unit": "absolute"})
    with pytest.raises(SpecError, match=r"unknown key 'latent' in features\[1\]; valid keys: feature, concept"):
        SweepSpec.from_dict({"features": [1, {"latent": 2}], "prompts": ["a"], "unit": "absolute"})
    with pytest.raises(SpecError, match="strengths value must be finite, got nan"):
        SweepSpec.from_dict({"features": [1], "strengths": [1, float("nan")], "prompts": ["a"], "unit": "absolute"})
    with pytest.raises(SpecError, match="give the sweep's inputs either as `world`"):
        SweepSpec.from_dict({"features": [1], "unit": "absolute"})
    path = tmp_path / "s.yaml"
    path.write_text("features: [1, {concept: red, strengths: [2]}]\nunit: absolute\n"
                    "world: {task: color, n: 3}\nstrengths: [0.5, .inf]\n")
    with pytest.raises(SpecError, match="strengths value must be finite, got inf"):
        SweepSpec.load(path)
    path.write_text(path.read_text().replace(".inf", "1"))
    spec = SweepSpec.load(path)
    assert spec.features[1].strengths == (2.0,) and spec.world.n == 3
    (tmp_path / "s.json").write_text(json.dumps({"features": [1], "prompts": "hi", "unit": "absolute", "colour": 1}))
    with pytest.raises(SpecError, match="unknown key 'colour' in the sweep spec"):
        SweepSpec.load(tmp_path / "s.json")


def _spec(**kw) -> SweepSpec:
    d = {"features": [3, {"feature": 5, "concept": "red"}], "strengths": [0.0, 600.0],
         "mode": "add", "unit": "absolute", "positions": "image", "world": {"task": "color", "n": 6, "split": "val"},
         "max_new_tokens": 3, "batch_size": 4, "engine": "torch", **kw}
    return SweepSpec.from_dict(d)


def test_sweep_records_metrics_and_plots(setup, run):
    r = run_sweep(_spec(), run, "records", setup, progress=False)
    sweep = RunLayout(run).sweep("records")
    assert r.out == sweep.root == run / "steering" / "records"
    lines = sweep.generations.read_text().splitlines()
    assert len(lines) == r.n_generated == 6 + 2 * 2 * 6
    rows = {(row["feature"], row["strength"]): row for row in r.rows}
    assert rows[(3, 0.0)]["changed"] == 0 and rows[(3, 0.0)]["kl"] < 1e-6  # adding 0 changes nothing
    assert rows[(5, 0.0)]["concept"] == "red" and rows[(5, 0.0)]["target_rate"] == 0
    assert rows[(3, 0.0)]["target_rate"] is None  # no concept for feature 3 (the random SAE has no recovery.json)
    assert all(row["coherence"] is not None and row["n"] == 6 for row in r.rows)
    assert {b["feature"] for b in r.best} == {3, 5}
    assert sweep.summary_csv.read_text().count("\n") == 5
    for path in (sweep.figure("html"), sweep.figure("png"), sweep.figure("json"), sweep.summary, sweep.spec,
                 sweep.identity, sweep.run_info):
        assert path.exists(), path
    assert "src=\"https://cdn.plot.ly" not in sweep.figure("html").read_text()  # plotly.js inside: renders offline
    again = run_sweep(_spec(), run, "records", setup, progress=False)
    assert again.n_generated == 0 and again.rows == r.rows
    with pytest.raises(IdentityError, match=r"the sweep in .*records was made with other settings \(mode: recorded "
                                            r"'add', now 'clamp'\): its generations would not be comparable"):
        run_sweep(_spec(mode="clamp"), run, "records", setup, progress=False)


def image_token_sae(lm) -> SAE:
    """An SAE at the subject's last layer whose feature 0 decodes along the direction that, through the final
    norm and the unembedding, makes the image placeholder the top token: adding a lot of it makes the model
    emit `<image>`."""
    image = lm.model.config.image_token_id
    w = lm.model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    target = -torch.ones(w.shape[0])
    target[image] = 10.0
    u = torch.linalg.lstsq(w, target[:, None]).solution[:, 0]
    sae = random_sae(hook="model.language_model.layers.3")
    with torch.no_grad():
        sae.W_dec[0] = u / lm.model.get_decoder().norm.weight.detach().float() / u.norm()
    return sae


def test_a_sweep_survives_a_steered_model_that_emits_the_image_placeholder(lm, tmp_path):
    """Fed back into its perplexity pass, a generated `<image>` made the model look for an image that is not
    there ("Image features and image tokens do not match"): continuation_nll masks it out of the input."""
    from steering.steer import placeholder_ids

    image = lm.model.config.image_token_id
    assert placeholder_ids(lm) == {image}
    image_token_sae(lm).save(RunLayout(tmp_path).sae)
    setup = setup_for(lm, SAE.load(RunLayout(tmp_path).sae).eval(), tmp_path)
    spec = _spec(features=[0], strengths=[0.0, 1e4], positions="all", max_new_tokens=3)
    r = run_sweep(spec, tmp_path, "placeholder", setup, progress=False)
    steered = [rec for rec in RunLayout(tmp_path).sweep("placeholder").generations.read_text().splitlines()
               if '"kind": "steered"' in rec and '"strength": 10000.0' in rec]
    assert len(steered) == 6 and all(json.loads(rec)["tokens"][0] == image for rec in steered)
    assert all(json.loads(rec)["nll"] > 5 for rec in steered)  # finite, and the clean model is surprised
    assert {row["strength"]: row["changed"] for row in r.rows} == {0.0: 0.0, 1e4: 1.0}  # rates over the 6 images
    baseline = [json.loads(rec) for rec in RunLayout(tmp_path).sweep("placeholder").generations.read_text()
                .splitlines() if '"kind": "baseline"' in rec]
    assert len(baseline) == 6 and all(0 <= rec["nll"] < 0.1 for rec in baseline)  # the clean answers, confident


def test_sweep_killed_and_rerun_loses_and_redoes_nothing(setup, run, monkeypatch):
    import steering.steer as steer_mod

    calls = {"n": 0, "rows": 0}
    real = steer_mod.generate

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the "kill"
        g = real(*a, **k)
        calls["rows"] += len(g.texts)
        return g

    monkeypatch.setattr(steer_mod, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_spec(), run, "killed", setup, progress=False)
    path = RunLayout(run).sweep("killed").generations
    before = {json.loads(line)["key"]: line for line in path.read_text().splitlines()}
    assert 0 < len(before) == calls["rows"] < 30
    with open(path, "a") as f:  # and a torn last line, as a kill during a write leaves
        f.write('{"kind": "steered", "key": "[5, 600.0, \\"what col')
    monkeypatch.setattr(steer_mod, "generate", real)
    counted = {"rows": 0}

    def counting(*a, **k):
        g = real(*a, **k)
        counted["rows"] += len(g.texts)
        return g

    monkeypatch.setattr(steer_mod, "generate", counting)
    r = run_sweep(_spec(), run, "killed", setup, progress=False)
    lines = path.read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == len(set(keys)) == 30
    assert counted["rows"] == r.n_generated == 30 - len(before)
    assert all(line in lines for line in before.values())  # earlier records untouched


# ---------------------------------------------------------------- the commands


def test_commands_and_their_errors(run, tmp_path, cli):
    common = ["--image", "shapes:test:0:0", "--prompt", "what color is the circle ?"]
    r = cli("steer", run, *common, "--features", "3", "--mode", "add", "--value", "0")
    assert r.code == 0 and "baseline" in r.out and "Δp" in r.out and "red" in r.out
    r = cli("attribute", run, *common, "--show", "3", "--validate")
    assert r.code == 0 and "Spearman" in r.out
    for argv, words in ((["--features", "64"], "feature 64 is out of range: this SAE has 64 features (valid indices "
                                               "0..63)"),
                        (["--features", "3", "--value", "nan"], "value of the intervention on feature 3 must be "
                                                                "finite, got nan"),
                        (["-i", "3:clamp:inf"], "must be finite, got inf"),
                        (["--features", "3", "--unit", "max"], "needs the SAE's features.h5"),
                        ([], "nothing to steer: give --features F"),
                        (["--features", "3", "--layer", "1"], "not on layers.1")):
        r = cli("steer", run, *common, *argv)
        assert r.code == 2, argv
        err = r.err.strip().splitlines()
        assert err[-1].startswith("interp steer: error:") and words in err[-1], (argv, err)
        if "--layer" not in argv:  # only the layer check needs the model
            assert not any(line.startswith("Loading") for line in err), "bad interventions fail before loading"
    bad = tmp_path / "bad"
    random_sae(d_in=96).save(RunLayout(bad).sae)
    r = cli("steer", bad, "--image", "shapes:test:0:0", "--prompt", "x", "--features", "1")
    assert r.code == 2 and "d_in=96" in r.err and "d_model=128" in r.err
    spec = tmp_path / "s.yaml"
    spec.write_text("features: [3]\nstrengths: [0, 300]\nmode: add\nunit: absolute\n"
                    "world: {task: color, n: 4}\nmax_new_tokens: 3\n")
    r = cli("sweep", run, "--spec", spec, "--no-progress")
    assert r.code == 0 and "best strength" in r.out and (run / "steering" / "s" / "generations.jsonl").exists()
    spec.write_text(spec.read_text() + "positons: image\n")
    r = cli("sweep", run, "--spec", spec, "--name", "other")
    assert r.code == 2 and "unknown key 'positons' in the sweep spec; valid keys: features" in r.err
