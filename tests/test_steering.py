"""Steering and attribution on a random-init shapes-subject v2 (LLaVA: CLIP 128 x 4, Llama 128 x 8 layers,
the world v2 vocabulary) with SAEs at its middle layer 4: exactness of the edit, both engines,
positions (the object a question names among them), batches, bad input, the sweep's records and
resume, attribution against ablation, and planted directions that steering must find and flip
answers with, through `interp steer-targets` end to end."""

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
from steering.steer import Query, generate, next_token_logits, prepare, question_region, setup_for, steer_one
from steering.sweep import SpecError, SweepSpec, answer_word, run_sweep

MIDDLE = "model.language_model.layers.4"


def random_sae(model: str, d_in: int = 128, d_sae: int = 64, hook: str = MIDDLE, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    return SAE(SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=4, model_name=str(model), hook_name=hook,
                         hook_layer=int(hook.rsplit(".", 1)[1]))).eval()


@pytest.fixture(scope="module")
def lm(subject_path):
    from interp.model.models import load_model

    return load_model(str(subject_path), device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory, subject_path):
    """A run directory holding only an SAE (random, at layer 4): no features.h5, no recovery.json."""
    run = tmp_path_factory.mktemp("steer-run")
    random_sae(subject_path).save(RunLayout(run).sae)
    return run


@pytest.fixture(scope="module")
def setup(lm, run):
    return setup_for(lm, SAE.load(RunLayout(run).sae).eval(), run)


def world_queries(task: str, n: int, split: str = "test") -> list[Query]:
    from interp.shapes.organisms.eval import world_items

    out = []
    for scene, qa in world_items(task, n, split=split):
        ref = f"shapes:{split}:{scene.index}:0"
        out.append(Query(qa.question, scene.render(), ref, question_region(ref, qa.question, scene)))
    return out


@pytest.fixture(scope="module")
def batch(lm):
    return prepare(lm, world_queries("color", 6))


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
                       ("1:clamp:1:percent", "absolute, max"),
                       ("1:clamp:1:max:everywhere", "image, object, text, generated, all")):
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


def test_sae_that_does_not_fit_the_model_is_named(lm, subject_path):
    with pytest.raises(InterventionError, match=r"d_in=64 .*layers\.4 \(model\.language_model\.layers\.4\).*=128"):
        sae_hook(lm, random_sae(subject_path, d_in=64))
    with pytest.raises(InterventionError, match="layers.9"):
        sae_hook(lm, random_sae(subject_path, hook="model.language_model.layers.9"))
    with pytest.raises(InterventionError, match=r"trained on layers\.4 .* not on layers\.2"):
        sae_hook(lm, random_sae(subject_path), layer=2)
    assert sae_hook(lm, random_sae(subject_path), layer=4).module_path == MIDDLE


# ---------------------------------------------------------------- the edit


def test_feature_edit_changes_exactly_the_targeted_latent():
    sae = random_sae("unused", d_in=16, d_sae=12)
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
    last = lm.model.config.text_config.num_hidden_layers - 1
    sae = random_sae(lm.path, hook=f"model.language_model.layers.{last}")
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
    assert {row["strength"]: row["changed"] for row in r.rows} == {0.0: 0.0, 1e4: 1.0}  # rates over the 6 images
    baseline = [json.loads(rec) for rec in RunLayout(tmp_path).sweep("placeholder").generations.read_text()
                .splitlines() if '"kind": "baseline"' in rec]
    # finite, and the clean model finds `<image>` less likely than its own greedy answers (the random model
    # is nearly uniform, so its greedy answers are only a little below log(vocabulary))
    vocab = np.log(len(lm.tokenizer))
    assert len(baseline) == 6 and all(0 <= rec["nll"] < vocab for rec in baseline)
    assert all(np.isfinite(json.loads(rec)["nll"]) for rec in steered)
    assert np.mean([json.loads(rec)["nll"] for rec in steered]) > np.mean([rec["nll"] for rec in baseline])


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


def test_commands_and_their_errors(run, tmp_path, cli, subject_path):
    common = ["--image", "shapes:test:0:0", "--prompt", "what color is the circle ?"]
    r = cli("steer", run, *common, "--features", "3", "--mode", "add", "--value", "0")
    assert r.code == 0 and "baseline" in r.out and "Δp" in r.out and "KL(baseline || steered) = 0.0000" in r.out
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
    random_sae(subject_path, d_in=96).save(RunLayout(bad).sae)
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


# ---------------------------------------------------------------- the object a question names


def test_object_positions_are_the_named_objects_patches(lm, setup):
    """"what color is the circle ?" -> the circle's patches; "what shape is the red object ?" -> the red one's:
    the image rows whose pixel box the object covers by more than 5% (recovery's labels), from the ground truth."""
    from interp.shapes.ground_truth import box_coverage, scene_of

    for task, kind in (("color", "shape"), ("shape", "color")):
        queries = world_queries(task, 6)
        b = prepare(lm, queries)
        assert (b.masks["object"] <= b.masks["image"]).all()
        for i, q in enumerate(queries):
            rows = b.table[i * b.length: (i + 1) * b.length]
            scene = scene_of(q.image_ref)
            named = q.prompt.split()[4] if task == "shape" else q.prompt[len("what color is the "):-2]
            image = b.masks["image"][i].numpy()
            boxes = np.stack([rows[k] for k in ("x0", "y0", "x1", "y1")], 1).astype(float)[image]
            want = box_coverage(scene, boxes, (f"{kind}:{named}",))[:, 0] > 0.05
            assert want.any() and (~want).any()
            assert np.array_equal(b.masks["object"][i].numpy()[image], want), (q.prompt, q.image_ref)
    # the edit touches those rows and no other
    f = active_feature(setup, batch := prepare(lm, world_queries("color", 4)))
    out = torch.randn(*batch.masks["image"].shape, 128)
    edited = FeatureEdit(setup.sae, [Intervention(f, "clamp", 50.0, positions="object")], batch.masks)(out, 0)
    moved = (edited != out).any(-1)
    assert moved.any() and (moved <= batch.masks["object"]).all()


def test_object_positions_need_a_question_that_names_an_object(lm, setup, run, subject_path):
    count = world_queries("count", 2)
    assert all(q.region is None for q in count)  # "how many objects are there ?" names none
    b = prepare(lm, count)
    assert "object" not in b.masks
    with pytest.raises(InterventionError, match="no 'object' positions .* use one of image, text, generated, all"):
        generate(setup, b, [Intervention(1, "clamp", 1.0, positions="object")], max_new_tokens=1)
    q = world_queries("color", 1)[0]
    loaded = Query.load(q.prompt, q.image_ref)  # `interp steer --image shapes:...` finds the object too
    assert loaded.region is not None and np.array_equal(loaded.region, q.region)
    assert Query.load(q.prompt, None).region is None
    with pytest.raises(SpecError, match="positions 'object' .* need `world` questions or shapes-world `images`"):
        SweepSpec.from_dict({"features": [1], "prompts": ["what color is the circle ?"], "positions": "object",
                             "unit": "absolute"})
    spec = _spec(world={"task": "count", "n": 3}, positions="object")
    with pytest.raises(SpecError, match=r"positions 'object' need a question naming one object .* 3 of the 3 "
                                        r"inputs name none \(e.g. 'how many objects are there \?'"):
        run_sweep(spec, run, "object-count", setup, progress=False)
    assert not RunLayout(run).sweep("object-count").root.exists()  # refused before anything was written


def test_concepts_by_name_or_value():
    from interp.shapes.concepts import ConceptMatch, RecoveryReport
    from steering.sweep import concept_match
    from steering.targets import TargetsError, feature_rounds, kind_matches

    m = lambda c, f, f1=1.0: ConceptMatch(c, f, 0.1, f1, 1.0, 1.0, 1.0, 10, 0.5)  # noqa: E731
    report = RecoveryReport([m("color:red", 3), m("color:blue", 4, 0.95), m("color:cyan", 4, 0.6),
                             m("shape:letter e", 7), m("size:small", 9)])
    assert answer_word("color:red") == "red" and answer_word("shape:letter e") == "letter e"
    assert answer_word("red") == "red" and answer_word(None) is None
    assert concept_match(report, "red", "x").concept == "color:red"
    assert concept_match(report, "shape:letter e", "x").feature == 7
    with pytest.raises(SpecError, match=r"features\[2\] names concept 'magenta', which the run's recovery report "
                                        r"does not have; known concepts: color:red, color:blue"):
        concept_match(report, "magenta", "features[2]")
    assert [[m.concept for m in g] for g in feature_rounds(report.concepts)] == [
        ["color:red", "shape:letter e", "size:small", "color:blue"], ["color:cyan"]]  # best F1 first
    own, shared = kind_matches(report, "color")
    assert [o.concept for o in own] == ["color:red", "color:blue"] and shared == ["color:cyan"]  # blue's F1 wins
    with pytest.raises(TargetsError, match="no 'fill' concepts .* its kinds: color, shape, size"):
        kind_matches(report, "fill")


# ---------------------------------------------------------------- planted directions, end to end


def answer_direction(lm, word: str) -> torch.Tensor:
    """A unit direction of the residual stream that, through the final norm and the unembedding, makes
    `word` the model's top next token wherever it dominates the residual."""
    w = lm.model.get_output_embeddings().weight.detach().float()
    target = -torch.ones(w.shape[0])
    target[lm.tokenizer.convert_tokens_to_ids(word)] = 10.0
    u = torch.linalg.lstsq(w, target[:, None]).solution[:, 0] / lm.model.get_decoder().norm.weight.detach().float()
    return u / u.norm()


PLANTED_SHAPES = ("circle", "square", "triangle", "diamond", "star")  # one-token answers


def make_planted_run(lm, subject_path, run, decoy: tuple[str, str] = ("pink", "cyan")) -> list[str]:
    """A layer-4 cache of the random subject, and a ReLU SAE whose feature j is 1 on every row (W_enc 0, b_enc 1)
    and decodes along `answer_direction` of concept j's value x 100; the recovery report names them. The decoy
    concept (pink) is matched to a feature that decodes to another colour (cyan), so steering it must not flip
    answers to pink; star is matched (F1 0.5) to circle's feature, which it then shares. Returns the concepts
    in feature order."""
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.writer import CacheConfig, build_cache
    from interp.shapes.concepts import ConceptMatch, RecoveryReport, write_recovery
    from interp.shapes.world import COLORS
    from saes.sae import sae_fingerprint

    layout = RunLayout(run)
    build_cache(CacheConfig(run=str(run), model=str(subject_path), layer="4", samples=12, batch_size=12))
    concepts = [f"color:{c}" for c in COLORS] + [f"shape:{s}" for s in PLANTED_SHAPES]
    sae = SAE(SAEConfig(arch="relu", d_in=128, d_sae=len(concepts) + 4, model_name=str(subject_path),
                        hook_name=MIDDLE, hook_layer=4)).eval()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
        for j, concept in enumerate(concepts):
            word = answer_word(concept)
            sae.b_enc[j] = 1.0
            sae.W_dec[j] = 100 * answer_direction(lm, decoy[1] if word == decoy[0] else word)
    sae.save(layout.sae)
    compute_features(FeaturesConfig(run=str(run), progress=False))
    circle = concepts.index("shape:circle")
    matches = [ConceptMatch(c, circle, 0.5, 0.5, 0.5, 0.5, 0.5, 10, 0.2) if c == "shape:star" else
               ConceptMatch(c, j, 0.5, 1.0, 1.0, 1.0, 1.0, 10, 0.2) for j, c in enumerate(concepts)]
    write_recovery(RecoveryReport(matches, extra={"sae_sha256": sae_fingerprint(layout.sae)}), layout.recovery)
    return concepts


def test_planted_directions_flip_answers_through_steer_targets(lm, subject_path, tmp_path):
    """The whole of `interp steer-targets` at the SAE's own (middle) layer: strengths picked on validation
    questions (1x max changes nothing: a clamp to the feature's own value), flip rates on test questions, the
    decoy counted as no flip, the summary and its headline keys."""
    from interp.pipeline.stages import steer_and_attribute
    from steering.targets import headline, shapes_targets

    run = tmp_path / "planted"
    concepts = make_planted_run(lm, subject_path, run)
    r = shapes_targets(run, n_select=10, n_eval=16, n_attr=4, n_validate=2, strengths=(1.0, 4.0),
                       positions=("object", "text"),
                       ig_steps=2, max_new_tokens=1, reach_questions=40, device="cpu", progress=False)
    layout = RunLayout(run)
    assert r == json.loads(layout.steering_summary.read_text())
    assert r["sae_layer"] == r["steering_layer"] == 4 and r["layer"] == "layers.4"
    colour, shape = r["flip"]["color"], r["flip"]["shape"]
    assert set(colour["per_concept"]) == set(concepts[:8]) and set(shape["per_concept"]) == set(concepts[8:])
    for concept, v in {**colour["per_concept"], **shape["per_concept"]}.items():
        if concept in ("color:pink", "shape:star"):  # decode to cyan and circle: those answers, never theirs
            assert v["flip_rate"] == 0.0 and v["changed"] > 0.5, v
        else:  # the planted directions act on the last prompt token: every feature picks "text" over "object"
            assert v["positions"] == "text" and v["strength_x_max"] == 4.0 and v["flip_rate"] == 1.0, (concept, v)
            assert v["n"] >= 8
    sel = r["selection"]["color"]
    assert sel["split"] == "val" and sel["best"]["color:red"]["strength"] == 4.0 and r["positions"] == ["object", "text"]
    assert sel["best"]["color:red"]["target_rate"] == 1.0  # at "object" the random model's answers hardly move:
    assert (sel["by_positions"]["object"]["color:red"].get("target_rate") or 0) < 0.5  # none coherent, or few
    assert sel["best"]["color:pink"]["note"] == "no strength moved any answer to the target"
    for kind, split in (("color", "val"), ("color", "test"), ("shape", "test")):
        spec = json.loads(layout.sweep(f"{'select' if split == 'val' else 'test'}-{kind}-text").spec.read_text())
        assert spec["world"]["split"] == split and spec["world"]["task"] == kind
    assert colour["overall"] == pytest.approx(sum(v["n"] for c, v in colour["per_concept"].items()
                                                  if c != "color:pink") / colour["n"])
    assert shape["per_concept"]["shape:star"]["shares_feature_with"] == ["shape:circle"]
    assert shape["sharing_a_feature"] == ["shape:star"] and layout.sweep("test-shape-text-2").summary.exists()
    assert shape["overall"] == pytest.approx(sum(v["n"] for c, v in shape["per_concept"].items()
                                                 if c != "shape:star") / shape["n"])
    h = headline(r)
    assert h["steering_success"] == round(colour["overall"], 4)
    assert h["steering_success_shape"] == round(shape["overall"], 4)
    assert h["sae_layer"] == h["steering_layer"] == 4
    for key in ("attribution_top5", "attribution_top5_patching", "attribution_top5_shape"):
        assert 0 <= h[key] <= 1
    assert 0 <= r["reach"]["answers_changed"] <= 1
    assert r["targets"]["flip_rate>=0.8 (shape)"] is (shape["overall"] >= 0.8)
    # the pipeline's stage: the same measurement at the defaults' positions, its headline keys
    out = steer_and_attribute(run, 0, n_select=3, n_eval=3, n_attr=2)
    assert set(out) == set(h) and out["steering_positions"] == ["image", "all"] and out["sae_layer"] == 4
    assert layout.sweep("select-color-image").summary.exists() and layout.sweep("select-shape-all").summary.exists()


def test_steer_targets_bad_input(lm, subject_path, tmp_path, cli):
    from interp.shapes.concepts import load_recovery, write_recovery

    run = tmp_path / "run"
    make_planted_run(lm, subject_path, run)
    for argv, words in ((["--select-questions", "0"], "argument --select-questions: must be at least 1, got 0"),
                        (["--kinds", "size"], "--kinds: unknown 'size'; choose from color, shape"),
                        (["--positions", "image,everywhere"], "--positions: unknown 'everywhere'; choose from image, "
                                                              "object, text, all"),
                        (["--strengths", "nan"], "--strengths value must be finite, got nan")):
        r = cli("steer-targets", run, *argv)
        assert r.code == 2 and words in r.err.strip().splitlines()[-1], (argv, r.err)
    report = load_recovery(RunLayout(run).recovery)
    report.concepts = [m for m in report.concepts if m.concept.startswith("color:")]
    write_recovery(report, RunLayout(run).recovery)
    r = cli("steer-targets", run)
    err = r.err.strip().splitlines()
    assert r.code == 2 and "the recovery report has no 'shape' concepts (kind:value names); its kinds: color" in err[-1]
    assert not any(line.startswith("Loading") for line in err), "a report without shape concepts fails before loading"
    assert not RunLayout(run).steering_summary.exists()
