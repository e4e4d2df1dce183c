"""docs/formats.md is the spec: every table marked `<!-- schema: NAME -->` there is read here and held
against what the writers wrote (names, and types or dtypes), in both directions: a field the
writer adds, drops or renames fails until the document says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from interp.infra.layout import RunLayout, SweepDir

SPEC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def schemas() -> dict[str, dict[str, tuple[str, bool]]]:
    """{schema name: {field: (type, optional)}} from the marked tables of the spec."""
    lines = SPEC.read_text().splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"<!-- schema: (\S+) -->", line.strip())
        if not m:
            continue
        rows, j = {}, i + 3  # the table's header and separator lines come first
        while j < len(lines) and lines[j].startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", lines[j])[1:-1]]
            typ = cells[1].replace("\\|", "|").strip("`")
            rows[cells[0].strip("`")] = (typ.rstrip("?"), typ.endswith("?"))
            j += 1
        out[m.group(1)] = rows
    return out


SCHEMAS = schemas()
JSON_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict,
              "null": type(None)}


def check_record(record: dict, name: str) -> None:
    """Keys of `record` against schema `name`: every required key present, no key the spec lacks, types."""
    spec = SCHEMAS[name]
    required = {k for k, (_, optional) in spec.items() if not optional}
    assert required <= set(record), f"{name}: missing {sorted(required - set(record))}"
    assert set(record) <= set(spec), f"{name}: not in docs/formats.md: {sorted(set(record) - set(spec))}"
    for key, value in record.items():
        typ = spec[key][0]
        if typ == "json":
            continue
        allowed = tuple(t for part in typ.split("|") for t in np.atleast_1d(JSON_TYPES[part]))
        assert isinstance(value, allowed), f"{name}.{key}: {value!r} is not {typ}"


def check_world_explanation(rec: dict) -> None:
    """An ok explanation record of the world protocol: its raw answers and its examples agree."""
    assert rec["explainer"].startswith("world:"), rec["explainer"]
    assert len(rec["examples"]) == len(rec["sources"])
    assert set(rec["sources"]) <= {"top", "negative"} | {f"q{i}" for i in range(16)}, rec["sources"]
    raw = json.loads(rec["raw"])
    check_record(raw, "explanations/raw")
    for region in raw["regions"]:
        check_record(region, "explanations/raw/region")
        assert region["sample"] in rec["examples"] and region["source"] not in ("negative", "silent")
    for region in raw["silent"]:
        check_record(region, "explanations/raw/silent")
        assert region["source"] in ("negative", "silent") and region["sample"] in rec["examples"]
    assert 0 < len(raw["regions"]) and len(raw["silent"]) <= len(raw["regions"])
    negatives = rec["sources"].count("negative")
    assert rec["sources"][len(rec["sources"]) - negatives:] == ["negative"] * negatives  # contrast images last
    if "captions" in raw:
        assert len(raw["captions"]) == len(rec["examples"]) - negatives
        assert len(raw["negative_captions"]) == negatives
    assert "cutoff" in rec["explainer_config"] and "agree" in rec["explainer_config"]


def check_world_score(rec: dict) -> None:
    """An ok score record of the world protocol: one sample, verdict and description per region, positives first,
    and the detection counts are counts of those regions."""
    check_record(rec["detection"], "scores/detection")
    check_record(rec["detection_oracle"], "scores/detection")  # the shapes run's images: the oracle describes them
    det = rec["detection"]
    assert len(rec["samples"]) == len(rec["verdicts"]) == len(rec["descriptions"])
    assert det["n_pos"] + det["n_neg"] + det["n_unreadable"] == len(rec["samples"])
    assert det["n_unreadable"] == sum(v is None for v in rec["verdicts"])
    assert all(v in (0.0, 1.0, None) for v in rec["verdicts"]) and all(isinstance(d, str) for d in rec["descriptions"])
    oracle = rec["detection_oracle"]
    assert oracle["n_pos"] + oracle["n_neg"] + oracle["n_unreadable"] == len(rec["samples"])


def dtype_code(dt) -> str:
    if h5py.check_string_dtype(dt) is not None:
        return "str"
    return dt.str.lstrip("<>|=")


def test_every_schema_the_tests_use_is_in_the_spec():
    assert {"layout", "run_info", "cache/tokens", "cache/samples", "cache/attrs", "sae/cfg", "sae/metadata",
            "train/metrics", "eval", "eval/spliced", "features/datasets", "features/attrs", "recovery",
            "recovery/concept", "store/header", "explanations/record", "explanations/raw", "explanations/raw/region",
            "explanations/raw/silent", "scores/record", "scores/detection", "score_summary", "score_summary/all",
            "score_summary/matched", "score_summary/feature", "sweep/layout", "sweep/identity", "sweep/baseline",
            "sweep/steered", "sweep/row", "steering_summary", "summary"} <= set(SCHEMAS)


def test_the_layout_is_the_spec(tmp_path):
    layout = RunLayout(tmp_path)
    table = {attr: path for attr, (path, _) in SCHEMAS["layout"].items()}
    for attr, path in table.items():
        assert getattr(layout, attr) == tmp_path / path, attr
    paths = {name for name in dir(RunLayout) if isinstance(getattr(RunLayout, name), property)
             and isinstance(getattr(layout, name), Path)}
    assert paths == set(table), f"RunLayout paths not in the spec: {paths - set(table)}; gone: {set(table) - paths}"
    sweep = SweepDir(tmp_path)
    for attr, (name, _) in SCHEMAS["sweep/layout"].items():
        assert getattr(sweep, attr) == tmp_path / name, attr


def test_the_cache_is_the_spec(shapes_run):
    with h5py.File(RunLayout(shapes_run).cache) as f:
        for table in ("tokens", "samples"):
            dt = f[table].dtype
            assert list(dt.names) == list(SCHEMAS[f"cache/{table}"]), table
            for name in dt.names:
                assert dtype_code(dt[name]) == SCHEMAS[f"cache/{table}"][name][0], (table, name)
        assert f["activations"].ndim == 2 and set(f) == {"activations", "tokens", "samples"}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    assert set(attrs) == set(SCHEMAS["cache/attrs"])
    for key, (typ, _) in SCHEMAS["cache/attrs"].items():
        if typ == "json":
            json.loads(attrs[key])
        elif typ == "int":
            assert isinstance(attrs[key], (int, np.integer)), key
        else:
            assert isinstance(attrs[key], str), key
    assert attrs["format"] == "lmmscope.activations/3"


def test_the_sae_training_and_eval_are_the_spec(shapes_run, tmp_path):
    from saes import architectures
    from saes.sae import SAE, SAEConfig

    layout = RunLayout(shapes_run)
    cfg = json.loads((layout.sae / "cfg.json").read_text())
    check_record(cfg, "sae/cfg")
    check_record(cfg["metadata"], "sae/metadata")
    for arch in architectures.names():  # every architecture's export
        saved = json.loads((SAE(SAEConfig(arch=arch, d_in=8, d_sae=16, k=2)).save(tmp_path / arch) / "cfg.json")
                           .read_text())
        check_record(saved, "sae/cfg")
        check_record(saved["metadata"], "sae/metadata")
    for line in layout.metrics.read_text().splitlines():
        check_record(json.loads(line), "train/metrics")
    ev = json.loads(layout.eval.read_text())
    check_record(ev, "eval")
    check_record(ev["spliced"], "eval/spliced")
    assert layout.density_figure("html").exists() and layout.density_figure("json").exists()
    for path in layout.run_infos():
        check_record({k: v for k, v in json.loads(path.read_text()).items() if k in SCHEMAS["run_info"]}, "run_info")
    assert {p.name for p in layout.run_infos()} >= {"train_run.json", "eval_run.json", "explain_run.json",
                                                    "score_run.json"}


def test_features_and_recovery_are_the_spec(shapes_run):
    layout = RunLayout(shapes_run)
    with h5py.File(layout.features) as f:
        names = []
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
        assert set(names) == set(SCHEMAS["features/datasets"])
        for name in names:
            if name != "samples":
                assert dtype_code(f[name].dtype) == SCHEMAS["features/datasets"][name][0], name
        assert set(f.attrs) == set(SCHEMAS["features/attrs"])
        assert f.attrs["format"] == "lmmscope.features/3"
    rec = json.loads(layout.recovery.read_text())
    check_record(rec, "recovery")
    for c in rec["concepts"]:
        check_record(c, "recovery/concept")
    assert rec["format"] == "lmmscope.recovery/1"
    # the concepts are the world's patch concepts by their kind:value names, the catch-all "object" left out
    from interp.shapes.world import concept_names

    assert [c["concept"] for c in rec["concepts"]] == [c for c in concept_names() if c != "object"]
    assert len(rec["concepts"]) == 32 and set(rec["recovered"]) <= {c["concept"] for c in rec["concepts"]}


def test_the_record_logs_are_the_spec(shapes_run, shapes_run_copy):
    from explain.commands import ExplainConfig, FeatureSelection, run_explain
    from explain.explainers import ExplainerOptions

    layout = RunLayout(shapes_run)
    for path, kind in ((layout.explanations, "explanations"), (layout.scores, "scores")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        check_record(lines[0], "store/header")
        assert lines[0]["store"] == kind and len(lines) > 1
        for rec in lines[1:]:
            check_record(rec, f"{kind}/record")
            if kind == "explanations" and rec["status"] == "ok":
                check_world_explanation(rec)
            if kind == "scores" and rec["status"] == "ok":
                check_world_score(rec)
    explained = [json.loads(line) for line in layout.explanations.read_text().splitlines()[1:]]
    assert any("negative" in r.get("sources", []) for r in explained), "no explanation shows a contrast image"
    summary = json.loads(layout.score_summary.read_text())
    check_record(summary, "score_summary")
    check_record(summary["all"], "score_summary/all")
    check_record(summary["matched"], "score_summary/matched")
    for entry in summary["matched"]["features"].values():
        check_record(entry, "score_summary/feature")
    assert summary["live_features"] >= summary["all"]["n"] > 0
    assert summary["detection_balanced_accuracy_all"] == summary["all"]["balanced_accuracy"]
    assert summary["explanation_accuracy"] == summary["matched"]["concept_accuracy"]
    assert summary["detection_balanced_accuracy"] == summary["matched"]["balanced_accuracy"]
    run = shapes_run_copy  # a failure record: the explainer's server is down
    (run / "explanations.jsonl").unlink()
    run_explain(ExplainConfig(run=str(run), selection=FeatureSelection(densest=1), explainer="http://127.0.0.1:9/v1",
                              options=ExplainerOptions(retries=0, timeout=1), max_failures=1, progress=False))
    failed = [json.loads(line) for line in (run / "explanations.jsonl").read_text().splitlines()][1:]
    assert failed and all(r["status"] == "error" for r in failed)
    for rec in failed:
        check_record(rec, "explanations/record")


def test_a_sweep_is_the_spec(shapes_run_copy):
    from steering.sweep import SweepSpec, run_sweep

    run = shapes_run_copy
    spec = SweepSpec.from_dict({"features": [0], "strengths": [0.0], "mode": "add", "unit": "absolute",
                                "world": {"task": "color", "n": 2}, "max_new_tokens": 2, "engine": "torch"})
    result = run_sweep(spec, run, "formats", progress=False)
    sweep = RunLayout(run).sweep("formats")
    check_record(json.loads(sweep.identity.read_text()), "sweep/identity")
    records = [json.loads(line) for line in sweep.generations.read_text().splitlines()]
    assert {r["kind"] for r in records} == {"baseline", "steered"}
    for rec in records:
        check_record(rec, f"sweep/{rec['kind']}")
    for row in result.rows:
        check_record(row, "sweep/row")
    assert set(json.loads(sweep.summary.read_text())) == {"rows", "best", "spec"}
    assert sweep.figure("html").exists() and sweep.summary_csv.exists() and sweep.run_info.exists()


@pytest.mark.slow
def test_the_demos_summary_and_steering_summary_are_the_spec(small_demo_run):
    layout = RunLayout(small_demo_run)
    check_record(json.loads(layout.summary.read_text()), "summary")
    summary = json.loads(layout.summary.read_text())
    assert "explained_features" not in summary and summary["concepts"] == 33
    steering = json.loads(layout.steering_summary.read_text())  # at the SAE's own layer: no twin
    check_record(steering, "steering_summary")
    assert steering["steering_layer"] == summary["steering_layer"] == summary["sae_layer"]
    assert not layout.steering_run(0).root.exists()
