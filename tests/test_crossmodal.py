"""All token roles together: question-answer data, the answer role, per-modality feature statistics, text
explanations (delphi's style) and cross-modal features, on a planted cross-modal direction."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from interp.cache.format import is_answer, is_image_patch, is_text, role_name
from interp.infra.layout import RunLayout

ROLES = ("image_patch", "text", "template", "answer")
SHARED = ("color:red", "shape:circle")  # one planted direction on their patches and on their words
SEPARATE = ("color:blue", "shape:square")  # one direction on the patches, another on the words


PLANTED_SAMPLES = 240  # enough questions name each planted word (about 1 in 14 names "red") for the
# explainer's top contexts and the scorer's held-out ones


def word(concept: str) -> str:
    """The word naming a concept in text ("color:red" -> "red")."""
    from saes.crossmodal import world_words

    return world_words([concept])[concept]


def qa_cache(run: Path, samples: int = 60, layer: str = "4") -> Path:
    from interp.cache.writer import CacheConfig, build_cache

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        build_cache(CacheConfig(run=str(run), layer=layer, data="shapes:train:qa", prompt_template="{image} {text}",
                                samples=samples, roles=ROLES, batch_size=30, dtype="float32"))
    return RunLayout(run).cache


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("qa") / "run"
    qa_cache(run)
    return run


def test_a_qa_source_caches_question_and_answer_with_their_roles(qa_run):
    from interp.cache.data import open_source
    from interp.cache.reader import ActivationReader
    from saes.crossmodal import tokenizer_of

    source = open_source("shapes:train:qa", 60)
    with ActivationReader(RunLayout(qa_run).cache) as r:
        tok = tokenizer_of(r)
        roles = r.tokens["role"]
        assert is_image_patch(roles).sum() == 64 * 60 and is_answer(roles).any() and is_text(roles).sum() > 5 * 60
        for i in range(8):
            s, truth = r.sample(i), source[i]
            assert s.prompt == truth.text
            answer = [t for t in s.tokens if role_name(t["role"]) == "answer"]
            assert tok.decode([int(t["token_id"]) for t in answer]) == truth.answer
            question = [t for t in s.tokens if role_name(t["role"]) == "text"]
            assert tok.decode([int(t["token_id"]) for t in question]) == truth.text
            assert np.all(np.diff(s.tokens["position"]) > 0)
    assert "qa" not in open_source("shapes:train", 5).describe()  # old caches keep their identity


def test_a_qa_source_needs_a_text_slot(tmp_path):
    from interp.cache.data import DataError, open_source
    from interp.cache.writer import CacheConfig, build_cache

    with pytest.raises(DataError, match=r"no \{text\} slot .*--prompt-template '\{image\} \{text\}'"):
        build_cache(CacheConfig(run=str(tmp_path / "r"), data="shapes:train:qa", samples=4))
    with pytest.raises(DataError, match="shapes\\[:SPLIT\\]\\[:qa\\]"):
        open_source("shapes:train:test:qa")


# ---------------------------------------------------------------- a planted cross-modal direction


def plant(run: Path, d: int = 24, strength: float = 6.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Replace the cache's activations by noise plus planted directions: each SHARED concept one unit direction
    on its patches and on the tokens of its word, each SEPARATE concept one direction per modality."""
    from interp.cache.reader import ActivationReader
    from saes.crossmodal import image_truth, tokenizer_of, word_truth, world_words

    layout = RunLayout(run)
    with ActivationReader(layout.cache) as r:
        n = r.n_rows
        img, txt = image_truth(r), word_truth(r, tokenizer_of(r), world_words(SHARED + SEPARATE))
    rng = np.random.default_rng(seed)
    dirs = np.linalg.qr(rng.normal(size=(d, d)))[0].T  # orthonormal rows
    x = rng.normal(size=(n, d)) * 0.3
    planted, k = {}, 0
    for c in SHARED + SEPARATE:
        u_img = dirs[k]
        u_txt = u_img if c in SHARED else dirs[k + 1]
        k += 1 if c in SHARED else 2
        on_img = img.rows[img.coverage[:, img.concepts.index(c)] > 0]
        on_txt = txt.rows[txt.coverage[:, txt.concepts.index(c)] > 0]
        x[on_img] += strength * u_img
        x[on_txt] += strength * u_txt
        planted[c] = u_img
    with h5py.File(layout.cache, "r+") as f:
        del f["activations"]
        f.create_dataset("activations", data=x.astype(np.float32))
        f.attrs["d"] = d
    return planted


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> Path:
    from explain.features import FeaturesConfig, compute_features
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, TrainRunConfig, run_train

    run = tmp_path_factory.mktemp("planted-crossmodal") / "run"
    qa_cache(run, samples=PLANTED_SAMPLES)
    plant(run)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        run_train(TrainRunConfig(run=str(run), sae=SAEConfig(d_sae=24, k=4),
                                 train=TrainConfig(steps=600, batch_size=256, progress=False, seed=0)))
        compute_features(FeaturesConfig(run=str(run), progress=False, top_samples=8, reservoir=16, negatives=12))
    from saes.crossmodal import CrossModalConfig, run_crossmodal

    run_crossmodal(CrossModalConfig(run=str(run)))  # RUN/crossmodal.json, which later stages read
    return run


def test_the_pipeline_finds_a_planted_cross_modal_direction(planted_run):
    from saes.crossmodal import CrossModalConfig, image_truth, load_crossmodal, run_crossmodal, world_words

    report = run_crossmodal(CrossModalConfig(run=str(planted_run)))
    by = {c.concept: c for c in report.concepts}
    for c in SHARED:  # one feature on the patches and on the word
        assert by[c].shared_f1 >= 0.9, (c, by[c])
        assert by[c].image.feature == by[c].text.feature == by[c].shared_feature
    for c in SEPARATE:  # a good feature on each modality, but not one for both
        assert by[c].image.f1 >= 0.9 and by[c].text.f1 >= 0.9, (c, by[c])
        assert by[c].image.feature != by[c].text.feature and by[c].shared_f1 < 0.9, (c, by[c])
    for c in ("color:green", "shape:triangle"):  # nothing planted
        assert by[c].shared_f1 < 0.9
    assert set(SHARED) == set(report.cross_modal)
    from interp.cache.reader import ActivationReader

    with ActivationReader(RunLayout(planted_run).cache) as r:  # every worded concept of the world is searched
        worded = world_words(image_truth(r).concepts)
    assert [c.concept for c in report.concepts] == list(worded) and {"color:red", "cell:top left"} <= set(worded)
    assert by["cell:top left"].word == "top left" and by["shape:letter k"].word == "letter k"
    assert report.cross_modal_fraction == round(len(SHARED) / len(worded), 4)
    back = load_crossmodal(RunLayout(planted_run).crossmodal)
    assert back.cross_modal == report.cross_modal and back.to_json()["concepts"] == report.to_json()["concepts"]
    assert {w for ws in report.text_matched().values() for w, _ in ws} >= {word(c) for c in SHARED + SEPARATE}


def test_feature_statistics_per_modality(planted_run):
    from explain.feature_reader import FeatureReader, FeatureSources
    from saes.crossmodal import load_crossmodal

    report = load_crossmodal(RunLayout(planted_run).crossmodal)
    by = {c.concept: c for c in report.concepts}
    with FeatureSources.open(planted_run) as src:
        stats: FeatureReader = src.features
        mods = stats.modalities()
        assert mods[by["color:red"].shared_feature] == "both"
        assert mods[by["color:blue"].image.feature] == "image" and mods[by["color:blue"].text.feature] == "text"
        assert stats.meta["n_image_rows"] == 64 * PLANTED_SAMPLES and stats.meta["n_text_rows"] > 0
        f = by["shape:square"].text.feature
        s = stats.stats(f)
        assert s.modality == "text" and s.density_text > 0 and s.max_image < 0.5 * s.max_text
        top = stats.top(f, modality="text")
        assert top and all(e.max > 0 for e in top) and top == sorted(top, key=lambda e: -e.max)
        for e in top[:3]:  # the text value is the max over the sample's text rows, on a token of the word
            tokens, acts = src.token_activations(f, e.sample, modality="text")
            assert acts.max() == pytest.approx(e.max, rel=1e-4)
        for e in stats.negatives(f, modality="text"):
            assert src.token_activations(f, e.sample, modality="text")[1].max() == 0
        assert all(e.max < 0.5 * s.max_text for e in stats.top(f))  # its image examples are noise
        bands = stats.quantile_samples(f, n_bands=2, per_band=3, modality="text")
        assert sum(len(b.examples) for b in bands) > 0
        with pytest.raises(ValueError, match="examples are of one of"):
            stats.top(f, modality="audio")


# ---------------------------------------------------------------- text explanations


def test_highlight_marks_runs_and_token_strings_keep_spacing():
    from explain.text import highlight, token_strings, window
    from interp.shapes.organisms import load_organism

    _, proc = load_organism("shapes-subject")
    ids = proc.tokenizer("is there a red circle ?", add_special_tokens=False)["input_ids"]
    pieces = token_strings(proc.tokenizer, ids)
    assert "".join(pieces).strip() == "is there a red circle ?"
    assert highlight(pieces, np.array([0, 0, 0, 1, 1, 0], bool)) == "is there a <<red circle>> ?"
    assert highlight(pieces, np.array([1, 0, 0, 1, 0, 1], bool)) == "<<is>> there a <<red>> circle <<?>>"
    assert window(100, 90, 16) == slice(78, 94) and window(10, 3, 16) == slice(0, 10)


def test_the_tokens_explanation_keeps_the_words_that_tell_examples_from_counterexamples():
    from explain.text import separate

    marked = [["square"], ["square"], ["square", "the"], ["right"], ["right", "no"], ["right"], ["fill"], ["what"]]
    seen = [set(m) | {"is", "the"} | ({"fill"} if i < 4 else set()) for i, m in enumerate(marked)]
    # "square" first (3 of 8), then "right" (3 more); "the" and "fill" are passed over in most examples that
    # hold them, and "no" and "what" are marked once: weak firing, not what the feature detects
    assert separate(marked, seen, [{"what", "color", "is", "it"}] * 5, max_words=8) == ["square", "right"]
    # a word that the counterexamples hold too tells nothing apart
    assert separate(marked, seen, [{"right"}, {"right"}, {"right"}, {"a"}, {"b"}], max_words=8) == ["square"]
    assert separate(marked, seen, [set()] * 5, max_words=1) == ["square"]
    assert separate([["a"], ["b"]], [{"a", "b"}] * 2, [set()], max_words=8) == []


def test_the_tokens_protocol_explains_and_scores_planted_text_features(planted_run):
    from explain.text_commands import TextExplainConfig, TextScoreConfig, run_explain_text, run_score_text
    from saes.crossmodal import load_crossmodal

    with contextlib.redirect_stdout(io.StringIO()):
        out = run_explain_text(TextExplainConfig(run=str(planted_run), progress=False))
        summary = run_score_text(TextScoreConfig(run=str(planted_run), progress=False))
    assert out["failed"] == 0 and not summary["failed"]
    layout = RunLayout(planted_run)
    report = load_crossmodal(layout.crossmodal)
    explanations = {json.loads(x)["feature"]: json.loads(x) for x in layout.text_explanations.read_text().splitlines()[1:]}
    for c in SHARED + SEPARATE:
        f = {x.concept: x for x in report.concepts}[c].text.feature
        assert explanations[f]["explanation"] == f'the word "{word(c)}"', explanations[f]
    m = summary["matched"]
    assert m["n"] == len(SHARED + SEPARATE) and m["text_explanation_accuracy"] == 1.0
    for r in m["features"].values():  # the word is in every top context and in no non-activating one ...
        f = next(int(k) for k, v in m["features"].items() if v is r)
        det = json.loads([x for x in layout.text_scores.read_text().splitlines()[1:]
                          if json.loads(x)["feature"] == f][-1])["detection"]
        assert det["recall_by_source"]["top"] == 1.0 and det["specificity"] == 1.0, det
    # ... while the lowest quantile bands of a TopK feature are its weak firing on anything (noise here)
    assert 0.6 < m["detection_balanced_accuracy"] < 1.0
    rec = json.loads(layout.text_scores.read_text().splitlines()[-1])
    assert set(rec["detection"]) >= {"balanced_accuracy", "auroc", "recall_by_source"} and rec["samples"]
    explained = set(explanations[rec["feature"]]["examples"]) | set(explanations[rec["feature"]]["negatives"])
    assert not explained & set(rec["samples"])  # scored on held-out contexts only
    assert json.loads(layout.text_score_summary.read_text())["matched"]["text_explanation_accuracy"] == 1.0


def test_text_records_made_with_other_counts_are_redone(planted_run, tmp_path):
    """As `interp explain`: a resumed explain-text or score-text reuses only records made the same way."""
    import shutil

    from explain.text_commands import TextExplainConfig, TextScoreConfig, run_explain_text, run_score_text

    run = tmp_path / "run"
    shutil.copytree(planted_run, run)
    with contextlib.redirect_stdout(io.StringIO()):
        first = run_explain_text(TextExplainConfig(run=str(run), redo=True, progress=False))["explained"]
        assert run_explain_text(TextExplainConfig(run=str(run), progress=False))["explained"] == 0
        assert run_explain_text(TextExplainConfig(run=str(run), explain_quantile=6, progress=False))["explained"] == first
        run_score_text(TextScoreConfig(run=str(run), redo=True, progress=False))
        to_do = lambda: json.loads(RunLayout(run).run_info("score-text").read_text())["to_do"]  # noqa: E731
        scored = to_do()
        run_score_text(TextScoreConfig(run=str(run), progress=False))
        assert to_do() == 0
        run_score_text(TextScoreConfig(run=str(run), score_quantile=6, progress=False))
    assert first > 0 and scored > 0 and to_do() == scored


class ReadsMarks:
    """A stand-in LMM behind the real HTTP server: it reads the marked tokens of an explain request and names the
    most common one, and answers a judge request by whether the named word is in the (marked) text."""

    name = "reads-marks"

    def complete(self, requests, top_logprobs: int = 0):
        import re
        from collections import Counter

        from explain.backends import Reply

        out = []
        for r in requests:
            text = "".join(p for p in r.parts if isinstance(p, str))
            if "[EXPLANATION]" in (r.system or ""):
                marked = Counter(m.strip().lower() for m in re.findall(r"<<([^>]+)>>", text.split("Counterexamples")[0]))
                word = marked.most_common(1)[0][0] if marked else "cannot tell"
                out.append(Reply(f"They mark one word.\n[EXPLANATION]: the word {word}", 10, 8))
            else:
                word = re.search(r'described as: "the word ([^"]+)"', text).group(1)
                body = text.split("\n", 1)[1].rsplit("\n", 1)[0]
                if "<<" in body:
                    ok = all(m.strip().lower() == word for m in re.findall(r"<<([^>]+)>>", body))
                else:
                    ok = word in re.findall(r"[a-z?]+", body.lower())
                out.append(Reply("yes" if ok else "no", 5, 1, p_yes=0.9 if ok else 0.1))
        return out


def test_the_generic_protocol_over_an_openai_compatible_server(planted_run, tmp_path):
    import shutil

    from explain.explainers import ExplainerOptions
    from explain.server import ExplainerServer
    from explain.text_commands import TextExplainConfig, TextScoreConfig, run_explain_text, run_score_text

    run = tmp_path / "run"
    shutil.copytree(planted_run, run, symlinks=True)
    for name in ("text_explanations.jsonl", "text_scores.jsonl", "text_score_summary.json"):
        (run / name).unlink(missing_ok=True)
    srv = ExplainerServer(ReadsMarks(), "reads-marks", port=0).start()
    try:
        opts = ExplainerOptions(api_model="reads-marks", retries=0, timeout=20)
        with contextlib.redirect_stdout(io.StringIO()):
            out = run_explain_text(TextExplainConfig(run=str(run), explainer=srv.url, options=opts, progress=False))
            summary = run_score_text(TextScoreConfig(run=str(run), options=opts, progress=False))
    finally:
        srv.close()
    assert out["failed"] == 0 and not summary["failed"]
    rec = json.loads((run / "text_explanations.jsonl").read_text().splitlines()[1])
    assert rec["protocol"] == "generic" and rec["explainer"].startswith("text-generic:http://127.0.0.1")
    assert "[EXPLANATION]" in rec["raw"]
    m = summary["matched"]
    assert m["n"] == len(SHARED + SEPARATE) and m["text_explanation_accuracy"] == 1.0, m
    assert 0.6 < m["detection_balanced_accuracy"] < 1.0 and 0.6 < m["fuzzing_balanced_accuracy"] < 1.0, m
    assert summary["all"]["tokens_in"] > 0 and summary["judge"].startswith("text-generic:")


def test_generic_protocol_parses_delphi_replies():
    from explain.prompts import CANNOT_TELL
    from explain.text import parse_explanation

    assert parse_explanation("thinking...\n[EXPLANATION]: colour words.") == "colour words"
    assert parse_explanation("Explanation: shapes") == "shapes"
    assert parse_explanation("[EXPLANATION]: cannot tell") == CANNOT_TELL


# ---------------------------------------------------------------- the app


def _app(monkeypatch, run: Path, page: str, query: dict | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LMMSCOPE_RUN_DIR", str(run))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "main.py"), default_timeout=120).run()
    if query:
        at.query_params.update(query)
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_the_feature_page_shows_text_examples_beside_image_examples(planted_run, monkeypatch):
    from app.text_view import shaded_html
    from saes.crossmodal import load_crossmodal

    red = {c.concept: c for c in load_crossmodal(RunLayout(planted_run).crossmodal).concepts}["color:red"]
    at = _app(monkeypatch, planted_run, "views/feature.py", {"feature": str(red.shared_feature)})
    headers = [h.value for h in at.header]
    assert "Top samples: image" in headers and "Top samples: text" in headers and "Quantile samples" in headers
    body = "\n".join(str(m.value) for m in at.markdown)
    assert "Modality **both**" in body
    shaded = [m for m in body.split("\n") if "<span" in m]
    assert shaded and any(">red</span>" in m and "rgba(255, 140, 0, 0.9" in m for m in shaded)
    assert len(at.get("image")) >= 3  # the image examples, beside the text ones
    html = shaded_html([" is", " there", " a", " red"], np.array([0, 0, 0.5, 1.0]), 1.0)
    assert html.startswith('<span style="background: rgba(255, 140, 0, 0.00)') and "0.45" in html and ">red<" in html


def test_the_feature_list_filters_by_modality(planted_run, monkeypatch):
    at = _app(monkeypatch, planted_run, "views/feature_list.py")
    assert set(at.dataframe[0].value["modality"]) >= {"image", "text", "both"}
    for modality in ("text", "image", "both"):
        at.segmented_control(key="modality").set_value(modality).run()
        assert not at.exception
        assert set(at.dataframe[0].value["modality"]) == {modality}


# ---------------------------------------------------------------- the layer sweep and steering on both sides


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    from interp.pipeline.crossmodal import CrossModalSweepConfig, run_crossmodal_sweep

    run = tmp_path_factory.mktemp("sweep") / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_crossmodal_sweep(CrossModalSweepConfig(run=str(run), layers=(0, 3), samples=40, d_sae=32, k=4, steps=80,
                                                   seeds=2))
    return run


def test_the_layer_sweep_writes_numbers_and_a_figure_per_layer(swept):
    from interp.pipeline.crossmodal import CrossModalSweepConfig, crossmodal_section
    from interp.shapes.world import concept_names
    from saes.crossmodal import world_words
    from saes.sae import sae_fingerprint

    worded = list(world_words(c for c in concept_names() if c != "object"))  # 25: colours, shapes, sizes, fills, cells
    layout = RunLayout(swept)
    sweep = json.loads(layout.crossmodal_sweep.read_text())
    assert [r["layer"] for r in sweep["layers"]] == [0, 3]
    for r in sweep["layers"]:
        sub = layout.crossmodal_run(r["layer"])
        report = json.loads(sub.crossmodal.read_text())
        assert r["cross_modal_fraction"] == report["cross_modal_fraction"] and list(r["concepts"]) == worded
        assert sub.cache.exists() and (sub.sae / "cfg.json").exists()
    assert layout.figure("crossmodal_sweep", "html").exists() and layout.figure("crossmodal_sweep", "png").exists()
    # a further SAE seed per layer: its own SAE on the layer's cache (a link), its own text explanations
    assert [(r["layer"], r["seed"]) for r in sweep["further_seeds"]] == [(0, 1), (3, 1)]
    for r in sweep["further_seeds"]:
        nested = layout.crossmodal_run(r["layer"]).seed_run(1)
        assert str(nested.root) == r["run"] and nested.cache.is_symlink() and nested.text_score_summary.exists()
        assert sae_fingerprint(nested.sae) != sae_fingerprint(layout.crossmodal_run(r["layer"]).sae)
    rows = sweep["layers"] + sweep["further_seeds"]
    pooled = sweep["text"]  # the word-matched text features of every layer and seed together
    assert pooled["matched"] == sum(r["text"]["matched"] for r in rows)
    assert set(pooled["per_seed"]) == {"0", "1"}
    for r in rows:
        summary = json.loads(RunLayout.of(r["run"]).text_score_summary.read_text())
        assert r["text"]["matched"] == summary["matched"]["n"] and r["text"]["features"] == summary["all"]["n"]
    t0 = layout.crossmodal_run(0).crossmodal.stat().st_mtime_ns
    with contextlib.redirect_stdout(io.StringIO()):  # a re-run reads every layer back
        again, lines = crossmodal_section(layout, samples=40, d_sae=32, k=4, steps=80, seed=0, layers=(0, 3), seeds=2)
    assert layout.crossmodal_run(0).crossmodal.stat().st_mtime_ns == t0
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again["layers"] + again["further_seeds"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    first = lines[:lines.index("Figure: `crossmodal_sweep.html` (and `.png`).")]
    assert lines[0] == "## Cross-modal features by layer" and sum(ln.startswith("| 0 |") or ln.startswith("| 3 |")
                                                                  for ln in first) == 2
    assert "### Text explanations of word-matched features" in lines
    assert sum(ln.startswith(("| 0 | 0 |", "| 0 | 1 |", "| 3 | 0 |", "| 3 | 1 |")) for ln in lines) == 4
    assert CrossModalSweepConfig().layers is None
    from interp.pipeline.crossmodal import add_crossmodal_section  # as `interp benchmark` runs it

    layout.report.write_text("# SAE architectures\n\n| arch |\n")
    report = {"architectures": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        add_crossmodal_section(layout, report, samples=40, d_sae=32, k=4, steps=80, seed=0, layers=(0, 3))
    assert json.loads(layout.benchmark.read_text())["crossmodal"]["layers"][1]["layer"] == 3 and "architectures" in report
    md = layout.report.read_text()
    assert md.startswith("# SAE architectures") and "## Cross-modal features by layer" in md and "\n| 3 | " in md


def test_steering_one_feature_on_text_and_on_image_positions(swept):
    from steering.crossmodal import CrossModalSteerConfig, steer_crossmodal

    run = RunLayout(swept).crossmodal_run(0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = steer_crossmodal(CrossModalSteerConfig(run=str(run.root), concept="red", strengths=(4.0,), questions=6,
                                                     progress=False))
    report = json.loads(run.crossmodal.read_text())
    red = next(c for c in report["concepts"] if c["concept"] == "color:red")  # "red" names it by its value
    assert out["concept"] == "color:red"
    assert out["feature"] == red["shared_feature"] and out["cross_modal"] == red["cross_modal"]
    (row,) = out["rows"]
    assert set(row) == {"strength", "image", "text"} and row["strength"] == 4.0
    for side in ("image", "text"):
        identity = json.loads(run.sweep(f"crossmodal-{side}").identity.read_text())
        assert identity["positions"] == side and identity["mode"] == "clamp" and identity["unit"] == "max"
        assert 0 <= row[side]["changed"] <= 1 and 0 <= row[side]["coherence"] <= 1
    assert json.loads(run.steering_crossmodal.read_text())["rows"] == out["rows"]
    assert run.figure("steering_crossmodal", "png").exists()


def test_the_demos_cross_modal_stage_gives_its_summary_keys(swept):
    from interp.pipeline.crossmodal import crossmodal_stage

    layout = RunLayout(swept)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        keys = crossmodal_stage(layout, 3, samples=40, d_sae=32, k=4, steps=80, seed=0)
    assert set(keys) == {"text_explanation_accuracy", "text_detection_balanced_accuracy", "text_features_explained",
                         "cross_modal_fraction"}
    sub = layout.crossmodal_run(3)
    summary = json.loads(sub.text_score_summary.read_text())
    assert keys["text_features_explained"] == summary["all"]["n"] > 0
    assert keys["text_explanation_accuracy"] == summary["matched"]["text_explanation_accuracy"]
    assert keys["cross_modal_fraction"] == json.loads(sub.crossmodal.read_text())["cross_modal_fraction"]
