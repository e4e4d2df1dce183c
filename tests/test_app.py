"""interp app: the run directory's stages, the feature table, the pages' computations, and every page
through streamlit's AppTest on a small shapes-world run (and on an empty directory)."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app import analysis, tables
from app.run_dir import STAGES, RunDir

MAIN = Path(__file__).resolve().parents[1] / "app" / "main.py"
PAGES = ("views/overview.py", "views/feature_list.py", "views/feature.py", "views/samples.py", "views/steering.py")


@pytest.fixture(scope="session")
def demo_run(shapes_run) -> Path:
    """The shared small shapes run (conftest), laid out as `interp demo` lays it out."""
    return shapes_run


def app_test(monkeypatch, run_dir: Path, page: str | None = None, query: dict | None = None):
    """The app on `run_dir`, on `page`, after one run; fails on any exception the page raised."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LMMSCOPE_RUN_DIR", str(run_dir))
    at = AppTest.from_file(str(MAIN), default_timeout=120).run()
    if query:
        at.query_params.update(query)
    if page and page != PAGES[0]:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def concepts(run: Path):
    """The recovery report's concepts (best feature per concept), in the world's order."""
    from interp.shapes.concepts import load_recovery

    return load_recovery(run / "recovery.json").concepts


def recovered_feature(run: Path) -> tuple[int, str]:
    best = max(concepts(run), key=lambda c: c.f1)
    return best.feature, best.concept


# ---------------------------------------------------------------- run directory


def test_run_dir_finds_every_stage_and_survives_a_move_or_a_link(demo_run, tmp_path):
    run = RunDir(demo_run)
    assert all(s.path is not None for s in run.status()), run.missing()
    assert run.model_name == "shapes-subject" and run.layer == "layers.4" and run.is_shapes
    assert run.sae == demo_run / "sae" and run.eval.name == "eval.json" and run.metrics.parent.name == "train"
    moved = tmp_path / "moved"
    shutil.copytree(demo_run, moved)
    other = RunDir(moved)
    assert other.cache == moved / "activations.h5" and other.sae == moved / "sae" and other.features is not None
    linked = tmp_path / "linked"  # a cache and an SAE from elsewhere, linked into a new run directory
    linked.mkdir()
    for name in ("activations.h5", "sae", "features.h5"):
        (linked / name).symlink_to(demo_run / name)
    assert RunDir(linked).cache == linked / "activations.h5" and RunDir(linked).sae == linked / "sae"
    assert [s.stage for s in RunDir(linked).missing()] == ["metrics", "eval", "recovery", "explanations", "scores"]
    nested = moved / "crossmodal-layer4"  # the demo's all-roles run at its layer, inside the main one
    nested.mkdir()
    shutil.copy(demo_run / "features.h5", nested / "features.h5")
    (moved / "crossmodal-layer3").mkdir()  # a folder without a stage's output is no run
    assert [p.name for p in other.subruns()] == ["crossmodal-layer4"] and run.subruns() == []


def test_missing_stages_name_their_commands(demo_run, tmp_path):
    empty = RunDir(tmp_path)
    assert [s.stage for s in empty.missing()] == list(STAGES)
    assert empty.command("features") == f"interp features {tmp_path}"
    assert empty.command("explanations") == f"interp explain {tmp_path}"
    assert empty.message("scores") == (f"No explanation scores (scores.jsonl) in this run yet. Make it with "
                                       f"`interp score {tmp_path}`.")
    assert "is not a directory" in RunDir(tmp_path / "nope").message("features")
    (tmp_path / "features.h5").write_bytes((demo_run / "features.h5").read_bytes())
    lone = RunDir(tmp_path)
    assert lone.features is not None and lone.cache is None and lone.sae is None
    assert lone.message("cache") == (f"No activation cache (activations.h5) in this run yet. Make it with `interp cache "
                                     f"{tmp_path} --model MODEL --layer LAYER --data shapes`, or link an "
                                     f"existing one to {tmp_path / 'activations.h5'}.")


# ---------------------------------------------------------------- feature table


def test_stores_are_read_tolerantly(tmp_path):
    path = tmp_path / "explanations.jsonl"
    lines = ['{"kind": "header", "store": "explanations"}', '{"feature": 1, "status": "ok", "explanation": "red"}',
             "not json", '{"feature": 2, "text": "a circle"}', '{"feature": 1, "status": "error", "error": "x"}',
             '{"feature": 3, "status": "ok", "explanation": "blue"}', '{"feature": 4, "explanation": "torn']
    path.write_text("\n".join(lines))
    store = tables.read_store(path)
    assert {f: tables.explanation_text(r) for f, r in store.items()} == {2: "a circle", 3: "blue"}
    assert tables.read_store(tmp_path / "absent.jsonl") == {}
    assert tables.score_value({"detection": {"balanced_accuracy": 0.75}}) == 0.75
    assert tables.score_value({"score": 0.5}) == 0.5 and np.isnan(tables.score_value({"detection": None}))


def test_feature_table_queries_are_vectorised_and_fast_for_100k_features():
    n = 100_000
    rng = np.random.default_rng(0)
    density = np.where(rng.random(n) < 0.3, 0.0, rng.random(n) * 0.2).astype(np.float32)
    summary = {"density": density, "max": rng.random(n).astype(np.float32) * 10,
               "mean_active": rng.random(n).astype(np.float32), "n_active": (density * 1e6).astype(np.int64),
               "image_share": np.ones(n, np.float32)}
    words = np.array(["red circle", "blue square", "cannot tell", "green cross"])
    explanations = {f: {"explanation": str(words[f % 4])} for f in range(0, n, 3)}
    scores = {f: {"detection": {"balanced_accuracy": float(f % 100) / 100}} for f in range(0, n, 6)}
    t = time.perf_counter()
    df = tables.build_table(summary, explanations, scores)
    built = time.perf_counter() - t
    t = time.perf_counter()
    rows = tables.select(df, tables.Query(search="CIRCLE", sort="score"))
    first = tables.page(rows, 0, 50)
    dense = tables.select(df, tables.Query(only_dense=True, sort="max activation", descending=False))
    unexplained = tables.select(df, tables.Query(only_unexplained=True, hide_dead=False))
    queried = time.perf_counter() - t
    assert built < 3.0 and queried < 1.0, (built, queried)
    assert len(rows) and (df["explanation"].to_numpy()[rows] == "red circle").all()
    assert (df["density"].to_numpy()[rows] > 0).all()
    s = df["score"].to_numpy()[first]
    assert (np.diff(s[np.isfinite(s)]) <= 0).all() and np.isfinite(s[0])  # best score first, unscored last
    assert (df["status"].to_numpy()[dense] == "dense").all()
    group = tables.explanation_group(df)[dense]  # named, then "cannot tell", then unexplained, whatever the sort
    assert (np.diff(group) >= 0).all() and set(group.tolist()) == {0, 1, 2}
    assert (group == 1).sum() == (df["vague"].to_numpy()[dense]).sum()
    for g in (0, 1, 2):
        assert (np.diff(df["max"].to_numpy()[dense][group == g]) >= 0).all()
    by_score = tables.select(df, tables.Query())  # the default: best score first, within each group
    assert (np.diff(tables.explanation_group(df)[by_score]) >= 0).all()
    s = df["score"].to_numpy()[by_score][tables.explanation_group(df)[by_score] == 0]
    assert np.isfinite(s[0]) and (np.diff(s[np.isfinite(s)]) <= 0).all() and np.isnan(s[-1])
    plain = tables.select(df, tables.Query(only_dense=True, sort="max activation", descending=False,
                                           explained_first=False))
    assert (np.diff(df["max"].to_numpy()[plain]) >= 0).all()
    assert len(tables.select(df, tables.Query(hide_vague=True, hide_dead=False))) == n - int(df["vague"].sum())
    assert len(unexplained) == n - len(explanations)
    assert list(tables.select(df, tables.Query(search="12", hide_dead=False))[:1]) == [12]
    assert len(tables.page(rows, 10**6, 50)) <= 50  # past the end: the last page


# ---------------------------------------------------------------- computations behind the pages


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_vl"])
def test_logit_effects_rank_tokens_as_the_final_norm_and_unembedding_do(tiny_path, family):
    from interp.model.models import load_model

    lm = load_model(str(tiny_path(family)), device="cpu")
    w_u, scale = analysis.unembedding(lm)
    d = torch.randn(w_u.shape[0], generator=torch.Generator().manual_seed(0))
    promoted, suppressed = analysis.logit_effects(d, w_u, scale, lm.tokenizer, k=5)
    decoder = lm.model.get_decoder()
    with torch.no_grad():  # RMSNorm of one vector is a positive multiple of the scaled vector
        exact = lm.model.get_output_embeddings()(decoder.norm(d[None, None].to(lm.dtype)))[0, 0]
    assert [e.token_id for e in promoted] == exact.topk(5).indices.tolist()
    assert [e.token_id for e in suppressed] == (-exact).topk(5).indices.tolist()
    assert promoted[0].logit > 0 > suppressed[0].logit


def test_nearest_features_concept_scores_and_patches(demo_run):
    from interp.cache.data import load_image
    from interp.cache.reader import ActivationReader
    from interp.model.models import load_model
    from interp.shapes.concepts import concept_scores
    from interp.shapes.ground_truth import token_concepts
    from saes.sae import SAE

    sae = SAE.load(demo_run / "sae")
    unit = analysis.unit_rows(sae.W_dec)
    near = analysis.nearest_features(unit, 3, k=4)
    cos = (unit @ unit[3]).numpy()
    cos[3] = -2
    assert [g for g, _ in near] == list(np.argsort(-cos)[:4]) and 3 not in [g for g, _ in near]
    feature, concept = recovered_feature(demo_run)
    with ActivationReader(demo_run / "activations.h5") as reader:
        gt = token_concepts(reader, with_object=False)
        col = analysis.feature_column(sae, reader, feature, gt.rows, chunk_rows=100)
        with torch.no_grad():
            dense = sae.encode(reader.read(0, reader.n_rows))[:, feature].numpy()
        np.testing.assert_allclose(col, dense[gt.rows], rtol=1e-5, atol=1e-4)
        best = concept_scores(col, gt.labels(), gt.concepts)[0]
        recorded = next(c for c in concepts(demo_run) if c.concept == concept)
        assert best["concept"] == concept and best["f1"] == pytest.approx(recorded.f1, abs=1e-6)
        assert 0 < best["iou"] <= 1
        rows, tokens = analysis.cached_rows(reader, 7)
        pf = analysis.patch_features(sae, rows, tokens, k=3)
        with torch.no_grad():
            acts = sae.encode(rows).numpy()
        assert pf.top_idx.shape == (64, 3) and pf.label(4) == "row 0, col 4" and pf.label(9) == "row 1, col 1"
        np.testing.assert_allclose(pf.top_val[:, 0], acts.max(1), rtol=1e-6)
        for g in pf.features:
            on = (pf.top_idx == g).any(1)
            np.testing.assert_allclose(pf.column(g)[on], acts[on, g], rtol=1e-6)
        # a new run of the model on the same image and prompt gives the cached rows (float16 in the cache)
        lm = load_model("shapes-subject", device="cpu")
        new_rows, new_tokens = analysis.model_rows(lm, reader.meta, load_image(reader.sample(7).image_ref),
                                                   "describe the image .")
        assert (new_tokens["row"] == tokens["row"]).all() and (new_tokens["col"] == tokens["col"]).all()
        torch.testing.assert_close(new_rows, rows, rtol=2e-3, atol=0.1)


# ---------------------------------------------------------------- the pages (AppTest)


def test_overview_page(demo_run, monkeypatch):
    from interp.shapes.world import concept_names

    at = app_test(monkeypatch, demo_run)
    assert at.title[0].value == "Overview" and not at.error
    body = texts(at.markdown)
    assert "shapes-subject" in body and "layers.4" in body and "topk, 32 features, k=4" in body
    assert {m.label for m in at.metric} >= {"FVU", "L0", "CE loss recovered", "Concepts recovered"}
    assert len(at.get("plotly_chart")) == 4  # training curves, density, scores, recovery
    recovery = at.dataframe[-1].value
    assert list(recovery["concept"]) == [c for c in concept_names() if c != "object"]  # the world's 32, in order
    assert len(recovery) == 32
    assert {"color:red", "shape:circle", "cell:top left", "background"} <= set(recovery["concept"])


def test_feature_list_page(shapes_run_copy, monkeypatch):
    """It opens on the best-scored explanations that name something, then "cannot tell", then the features not
    explained yet (issue 12: no wall of unexplained features first)."""
    import json

    from explain.aggregate import CANNOT_TELL

    run = shapes_run_copy
    explained = tables.read_store(run / "explanations.jsonl")
    vague, failed = sorted(explained)[:2]
    with open(run / "explanations.jsonl", "a") as f:  # as `interp explain --redo` appends them
        f.write(json.dumps({"feature": vague, "status": "ok", "explanation": CANNOT_TELL}) + "\n")
        f.write(json.dumps({"feature": failed, "status": "error", "error": "the explainer failed"}) + "\n")
    with open(run / "scores.jsonl", "a") as f:  # and its score record (which holds what it scored) with it
        f.write(json.dumps({"feature": failed, "status": "error", "error": "no explanation to score"}) + "\n")
    at = app_test(monkeypatch, run, "views/feature_list.py")
    assert at.selectbox(key="sort").value == "score" and at.checkbox(key="explained_first").value
    df = at.dataframe[0].value
    assert len(df) > 0 and (df["status"] != "dead").all()
    text = df["explanation"].to_numpy()
    group = np.where(text == "", 2, np.where(text == CANNOT_TELL, 1, 0))
    assert (np.diff(group) >= 0).all() and group[0] == 0 and {1, 2} <= set(group)
    assert vague in set(df["feature"][group == 1]) and failed in set(df["feature"][group == 2])
    for g in (0, 1, 2):  # best score first, the unscored after the scored, ties densest first
        part = df[group == g]
        score = part["score"].to_numpy()
        scored = np.isfinite(score)
        assert (np.diff(score[scored]) <= 0).all() and not (scored[1:] & ~scored[:-1]).any()
    n = [int((group == g).sum()) for g in (0, 1, 2)]
    assert f"{n[0]:,} explained, {n[1]:,} “cannot tell”" in texts(at.caption)
    assert f"{n[2]:,} not explained yet" in texts(at.caption)
    at.checkbox(key="explained_first").uncheck().run()
    score = at.dataframe[0].value["score"].to_numpy()
    scored = np.isfinite(score)
    assert (np.diff(score[scored]) <= 0).all() and not (scored[1:] & ~scored[:-1]).any()
    at.checkbox(key="explained_first").check().run()
    at.checkbox(key="hide_vague").check().run()
    assert len(at.dataframe[0].value) == len(df) - n[1] and vague not in set(at.dataframe[0].value["feature"])
    at.checkbox(key="hide_vague").uncheck().run()
    first = df.iloc[0]
    word = first["explanation"].split()[-1]
    at.text_input(key="search").set_value(word.upper()).run()
    hit = at.dataframe[0].value
    assert first["feature"] in set(hit["feature"]) and hit["explanation"].str.contains(word, case=False).all()
    at.text_input(key="search").set_value("").run()
    at.selectbox(key="sort").set_value("density").run()
    shown = at.dataframe[0].value
    order = np.where(shown["explanation"] == "", 2, np.where(shown["explanation"] == CANNOT_TELL, 1, 0))
    for g in (0, 1, 2):
        assert list(shown["density"][order == g]) == sorted(shown["density"][order == g], reverse=True)
    at.checkbox(key="only_unexplained").check().run()
    assert not at.exception and list(at.dataframe[0].value["explanation"].unique()) == [""]


def test_feature_page(demo_run, monkeypatch):
    feature, concept = recovered_feature(demo_run)
    at = app_test(monkeypatch, demo_run, "views/feature.py", {"feature": str(feature)})
    assert at.title[0].value.startswith(f"Feature {feature}") and not at.error
    assert f"Best feature for **{concept}**" in texts(at.markdown)
    assert len(at.get("image")) >= 3  # top samples and quantile samples, as heatmap overlays
    assert len(at.get("plotly_chart")) == 2  # activation histogram, logit effects
    assert len(at.get("page_link")) == 8  # nearest features
    assert at.dataframe[0].value["concept"].iloc[0] == concept  # this feature's concept scores, best first
    assert {m.label for m in at.metric} >= {"Density", "Image share", "balanced accuracy"}
    at.button_group(key="view").set_value("crop").run()
    assert not at.exception and len(at.get("image")) >= 3
    at.number_input(key="feature").set_value((feature + 1) % 32).run()
    assert at.title[0].value.startswith(f"Feature {(feature + 1) % 32}")


def test_explain_and_score_now_calls_the_explain_stage(shapes_run_copy, monkeypatch):
    feature, _ = recovered_feature(shapes_run_copy)
    at = app_test(monkeypatch, shapes_run_copy, "views/feature.py", {"feature": str(feature)})
    at.button(key="explain_now").click().run()
    assert not at.exception and not at.error, texts(at.code)
    assert "finished with status 0" in texts(at.success) and "to do" in texts(at.code)


def test_sample_explorer_page(demo_run, monkeypatch):
    at = app_test(monkeypatch, demo_run, "views/samples.py", {"sample": "3"})
    assert "shapes:train:3:0" in texts(at.caption)
    patches = [b for b in at.button if str(b.key).startswith("patch_")]
    assert len(patches) == 64 and {b.key for b in patches} == {f"patch_{r}_{c}" for r in range(8) for c in range(8)}
    at.button(key="patch_5_2").click().run()
    assert at.selectbox(key="patch").value == "row 5, col 2"
    assert len(at.get("image")) == 1 and len(at.dataframe) == 2
    at.text_input(key="prompt_cached").set_value("what color is the circle ?").run()  # runs the model
    assert not at.exception and not at.error and len(at.dataframe) == 2
    buf = io.BytesIO()
    from interp.cache.data import load_image

    load_image("shapes:test:5:0").save(buf, format="PNG")
    at.radio(key="source").set_value("upload").run()
    at.file_uploader(key="upload").set_value(("scene.png", buf.getvalue(), "image/png")).run()
    assert not at.exception and not at.error and len(at.dataframe) == 2
    assert len([b for b in at.button if str(b.key).startswith("patch_")]) == 64


def test_steering_page(demo_run, monkeypatch):
    at = app_test(monkeypatch, demo_run, "views/steering.py")
    feature = concepts(demo_run)[0].feature  # the default pick: the first concept's feature
    assert at.multiselect(key="steer_features").value == [feature]
    at.text_input(key="steer_prompt").set_value("what color is the circle ?").run()
    at.selectbox(key=f"unit_{feature}").set_value("max").run()
    at.number_input(key=f"value_{feature}").set_value(3.0).run()
    at.button(key="steer_go").click().run()
    assert not at.exception and not at.error
    assert [s.value for s in at.subheader] == ["Baseline", "Steered"] and len(at.main.code) == 2
    assert f"{feature} clamp 3×max @image" in texts(at.caption)


@pytest.mark.parametrize("page", PAGES)
def test_empty_run_directory_names_the_commands(tmp_path, monkeypatch, page):
    at = app_test(monkeypatch, tmp_path, page)
    shown = texts(at.info) + texts(at.error)
    assert "interp " in shown, shown
    assert not at.get("plotly_chart") and not at.get("image")


def test_missing_run_directory(tmp_path, monkeypatch):
    at = app_test(monkeypatch, tmp_path / "absent")
    assert "is not a directory" in texts(at.error)


# ---------------------------------------------------------------- interp app


def test_app_command_runs_streamlit(tmp_path, monkeypatch):
    import subprocess

    from app.commands import AppConfig, run_app

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert run_app(AppConfig(run=str(tmp_path), port=9123)) == 0
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("app/main.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and cmd[cmd.index("--server.port") + 1] == "9123"
    assert cmd[cmd.index("--server.headless") + 1] == "true" and cmd[-2:] == ["--", str(tmp_path.resolve())]
    with pytest.raises(FileNotFoundError, match=r"no run directory at .*absent: make one with `interp demo "):
        run_app(AppConfig(run=str(tmp_path / "absent")))


# ---------------------------------------------------------------- another model family, fewer stages


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, tiny_path) -> Path:
    """A tiny Qwen2-VL run (merged patches, image and text rows) with a cache, an SAE and features only."""
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.writer import CacheConfig, build_cache
    from saes.sae import SAE, SAEConfig

    run = tmp_path_factory.mktemp("qwen-run")
    build_cache(CacheConfig(run=str(run), model=str(tiny_path("qwen2_vl")), layer="1", samples=12, batch_size=6,
                            dtype="float32", roles=("image_patch", "text")))
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=32, d_sae=48, k=6))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.02)
    sae.save(run / "sae")
    compute_features(FeaturesConfig(run=str(run), top_samples=5, negatives=4, progress=False))
    return run


@pytest.mark.parametrize("page", PAGES)
def test_pages_on_another_family_without_eval_or_explanations(qwen_run, monkeypatch, page):
    from explain.feature_reader import FeatureReader

    with FeatureReader(qwen_run / "features.h5") as fs:
        live = int(np.flatnonzero(fs.summary_table()["n_active"])[0])
    at = app_test(monkeypatch, qwen_run, page, {"feature": str(live)} if page.endswith("feature.py") else None)
    assert not at.error, texts(at.error)
    shown = texts(at.info) + texts(at.caption)
    if page.endswith("overview.py"):
        assert "interp eval" in shown and "interp recovery" in shown and "interp train" in shown
        assert len(at.get("plotly_chart")) == 1  # the density histogram from features.h5
    if page.endswith("feature.py"):
        assert "interp explain" in shown and len(at.get("plotly_chart")) == 2
        assert len(at.get("image")) >= 1 or at.warning
    if page.endswith("samples.py"):
        assert len(at.dataframe) == 2
    if page.endswith("steering.py"):
        at.button(key="steer_go").click().run()
        assert not at.exception and not at.error and len(at.main.code) == 2


# ---------------------------------------------------------------- staleness, URLs, images, trust


def test_a_page_shows_an_explanation_written_while_the_app_runs(shapes_run_copy, monkeypatch):
    """The readers' cache keys carry the files' mtimes; named `_mtime`, Streamlit left them out of the key."""
    import json

    feature, _ = recovered_feature(shapes_run_copy)
    at = app_test(monkeypatch, shapes_run_copy, "views/feature.py", {"feature": str(feature)})
    new = "a purple glow written while the app runs"
    assert new not in at.title[0].value
    with open(shapes_run_copy / "explanations.jsonl", "a") as f:  # as `interp explain` appends it
        f.write(json.dumps({"feature": feature, "status": "ok", "explanation": new}) + "\n")
    at.run()
    assert not at.exception and at.title[0].value == f"Feature {feature} · {new}"
    at.switch_page("views/feature_list.py").run()
    at.text_input(key="search").set_value("purple glow").run()
    assert list(at.dataframe[0].value["feature"]) == [feature]


def test_the_url_follows_the_feature_and_an_invalid_id_warns(demo_run, monkeypatch):
    at = app_test(monkeypatch, demo_run, "views/feature.py", {"feature": "3"})
    assert at.title[0].value.startswith("Feature 3") and at.query_params["feature"] == "3" and not at.warning
    at.number_input(key="feature").set_value(5).run()
    assert at.title[0].value.startswith("Feature 5") and at.query_params["feature"] == "5"
    at.query_params["feature"] = "7"  # a link or a typed URL to another feature, on the same page
    at.run()
    assert at.title[0].value.startswith("Feature 7") and at.number_input(key="feature").value == 7
    for bad in ("999", "-1", "red"):
        at = app_test(monkeypatch, demo_run, "views/feature.py", {"feature": bad})
        shown = int(at.title[0].value.split()[1])
        assert f"?feature={bad} is not a feature of this run (0 .. 31): showing feature {shown} instead" in \
            texts(at.warning)
        assert at.query_params["feature"] == str(shown)  # the URL says what the page shows
    at = app_test(monkeypatch, demo_run, "views/samples.py", {"sample": "500"})
    assert "?sample=500 is not a cached sample of this run" in texts(at.warning) and not at.exception


def test_explanations_that_name_nothing_are_explained(shapes_run_copy, monkeypatch):
    """"cannot tell" and an explanation with context get a line saying what they mean; a plain one does not."""
    import json

    from explain.aggregate import CANNOT_TELL, CONTEXT
    from explain.feature_reader import FeatureReader

    with FeatureReader(shapes_run_copy / "features.h5") as fs:
        vague, context, plain = np.flatnonzero(fs.summary_table()["n_active"])[:3].tolist()
    written = {vague: CANNOT_TELL, context: f"empty background{CONTEXT}a red object", plain: "a red object"}
    with open(shapes_run_copy / "explanations.jsonl", "a") as f:  # as `interp explain` appends them
        for feature, text in written.items():
            f.write(json.dumps({"feature": feature, "status": "ok", "explanation": text}) + "\n")
    notes = {}
    for feature, text in written.items():
        at = app_test(monkeypatch, shapes_run_copy, "views/feature.py", {"feature": str(feature)})
        assert at.title[0].value == f"Feature {feature} · {text}"
        notes[text] = [c for c in texts(at.caption).splitlines() if c.startswith(f"“{text}”: ")]
    assert notes[CANNOT_TELL] == [f"“{CANNOT_TELL}”: the explainer found nothing the regions where the feature fires "
                                  "have in common that the regions where it is silent lack; no region's description "
                                  "satisfies it, so its detection is at chance (0.5)."]
    assert len(notes[written[context]]) == 1
    assert notes[written[context]][0].startswith(f"“{written[context]}”: it fires on empty background, and the images "
                                                 "it fires on hold a red object (somewhere else in the image)")
    assert notes["a red object"] == []


def test_every_label_of_the_logit_chart_is_shown():
    from app.analysis import TokenEffect
    from app.charts import token_effect_bars

    effects = [TokenEffect(t, i, float(i) - 7.5) for i, t in enumerate("abcdefghijklmnop")]
    fig = token_effect_bars(effects[8:], effects[:8])
    y = fig.layout.yaxis
    assert y.tickmode == "array" and list(y.ticktext) == [repr(t) for t in "abcdefghijklmnop"]
    assert list(y.tickvals) == list(range(16)) and fig.layout.height >= 16 * 20


def test_the_app_fetches_nothing_from_another_host():
    """The favicon is an emoji (a ':material/...:' favicon is fetched from fonts.gstatic.com); the browser
    test checks every request of a rendered page."""
    import ast

    from streamlit.string_util import is_emoji

    tree = ast.parse(MAIN.read_text())
    icon = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "PAGE_ICON")
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "set_page_config")
    assert is_emoji(icon) and any(k.arg == "page_icon" and getattr(k.value, "id", "") == "PAGE_ICON" for k in call.keywords)


def retarget_images(run: Path, ref, data: dict | None = None) -> None:
    """Point every sample of the run's cache and features file at `ref(i)`, optionally recording another data
    source, keeping the features file matched to its cache (as a run directory from elsewhere could)."""
    import json

    import h5py

    from explain.feature_reader import cache_fingerprint, cache_identity
    from interp.cache.reader import ActivationReader

    for name in ("activations.h5", "features.h5"):
        with h5py.File(run / name, "r+") as f:
            samples = f["samples"][:]
            samples["image_ref"] = [ref(i).encode() for i in range(len(samples))]
            f["samples"][...] = samples
            if data is not None and name == "activations.h5":
                f.attrs["data"] = json.dumps(data, sort_keys=True)
    with ActivationReader(run / "activations.h5") as r:
        identity = cache_identity(r.meta)
    with h5py.File(run / "features.h5", "r+") as f:
        f.attrs["cache_identity"] = json.dumps(identity, default=str)
        f.attrs["cache_fingerprint"] = cache_fingerprint(identity)


@pytest.fixture
def unreadable_run(shapes_run_copy, tmp_path) -> Path:
    """The run with every image a broken file inside the cache's recorded image folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(200):
        (folder / f"{i}.png").write_bytes(b"\x89PNG cut short")
    retarget_images(shapes_run_copy, lambda i: f"file:{folder / f'{i}.png'}", {"kind": "folder", "root": str(folder)})
    return shapes_run_copy


@pytest.mark.parametrize("page", PAGES[2:])
def test_an_unreadable_image_is_a_warning_on_every_page(unreadable_run, monkeypatch, page):
    feature, _ = recovered_feature(unreadable_run)
    at = app_test(monkeypatch, unreadable_run, page, {"feature": str(feature)})
    assert not at.exception and not at.get("image"), [e.value for e in at.exception]
    assert "cannot identify image file" in texts(at.warning), texts(at.warning) + texts(at.error)


def test_an_image_outside_the_data_roots_is_refused_by_the_app_and_the_explainer(shapes_run_copy, tmp_path,
                                                                               monkeypatch):
    """A run directory from elsewhere names images by path: a crafted one must not show or send what it points at."""
    import json

    from PIL import Image

    from explain.commands import ExplainConfig, FeatureSelection, run_explain

    secret = tmp_path / "private" / "holiday.png"
    secret.parent.mkdir()
    Image.new("RGB", (48, 48), (255, 0, 0)).save(secret)
    retarget_images(shapes_run_copy, lambda i: f"file:{secret}")  # the cache still records the shapes world
    feature, _ = recovered_feature(shapes_run_copy)
    for page in PAGES[2:4]:
        at = app_test(monkeypatch, shapes_run_copy, page, {"feature": str(feature)})
        assert not at.exception and not at.get("image")
        assert f"refusing to read image file:{secret}: {secret} is outside the data roots recorded with the cache" \
            in texts(at.warning)
    result = run_explain(ExplainConfig(run=str(shapes_run_copy), selection=FeatureSelection(features=(feature,)),
                                       progress=False, redo=True))
    assert result.failed == [feature]
    last = [json.loads(line) for line in (shapes_run_copy / "explanations.jsonl").read_text().splitlines()][-1]
    assert last["status"] == "error" and "refusing to read image" in last["error"] and "is outside" in last["error"]


def test_load_image_reads_only_under_the_roots(tmp_path):
    from PIL import Image

    from interp.cache.data import UntrustedImageError, data_roots, load_image

    inside, outside = tmp_path / "data" / "a" / "x.png", tmp_path / "elsewhere.png"
    inside.parent.mkdir(parents=True)
    for p in (inside, outside):
        Image.new("RGB", (8, 8), (0, 0, 255)).save(p)
    (tmp_path / "data" / "link.png").symlink_to(outside)
    roots = data_roots({"kind": "folder", "root": str(tmp_path / "data")})
    assert load_image(f"file:{inside}", roots).size == (8, 8) and load_image(f"file:{outside}").size == (8, 8)
    for ref in (f"file:{outside}", f"file:{tmp_path / 'data' / 'link.png'}", f"file:{tmp_path}/data/../elsewhere.png"):
        with pytest.raises(UntrustedImageError, match="is outside the data roots recorded with the cache"):
            load_image(ref, roots)
    with pytest.raises(UntrustedImageError, match=r"\(none \(the cache records no image folder or dataset\)\)"):
        load_image(f"file:{inside}", data_roots({"kind": "shapes"}))
    assert load_image("shapes:test:0:0", ()).size == (64, 64)  # generated scenes need no root
    assert data_roots('{"kind": "hf", "path": "/d"}') == (Path("/d").resolve(),) and data_roots(None) == ()


def test_interp_app_on_a_missing_directory_is_one_line(tmp_path, cli):
    r = cli("app", tmp_path / "absent")
    assert r.code == 2 and r.err.strip().count("\n") == 0
    assert f"interp app: error: no run directory at {tmp_path / 'absent'}: make one with `interp demo" in r.err
