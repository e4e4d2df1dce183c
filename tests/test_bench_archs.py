"""`interp benchmark`'s architectures section: every SAE scored under `architectures.<name>`, the README table."""

import json

import pytest

from interp.pipeline import bench_archs

KEYS = ("concept_recovery", "mean_f1", "absorption", "full_absorption", "sparse_probing_top1", "sparse_probing_top5",
        "mcc", "fvu", "l0", "dead_fraction")


def fake_report():
    row = {"trainer": "lmmscope", "fvu": 0.0174, "l0": 4.0, "dead_fraction": 0.7, "concept_recovery": 1.0,
           "mean_f1": 0.993, "absorption": 0.12, "full_absorption": 0.05, "sparse_probing_top1": 0.9,
           "sparse_probing_top5": 0.97, "mcc": 0.41, "ce_loss_recovered": 0.96, "explanation_accuracy": None}
    return {"architectures": {"topk": row, "sparsify": row | {"trainer": "sparsify", "absorption": 0.3}},
            "neurons": {"sparse_probing_top1": 0.6, "sparse_probing_top5": 0.8, "mean_f1": 0.74},
            "width_sweep": {"topk": {"64": {"fvu": 0.05, "dead_fraction": 0.1, "concept_recovery": 0.5,
                                            "features_per_concept": 1.2, "mean_split_features": 1.0, "absorption": 0.2}}}}


def test_table_renders_every_architecture_with_n_a_for_missing_numbers():
    table = bench_archs.render_table(fake_report())
    lines = table.splitlines()
    assert lines[0].startswith("| SAE | trainer | FVU |") and "absorption" in lines[0] and "MCC" in lines[0]
    assert lines[2].startswith("| topk | lmmscope | 0.0174 | 4.0 | 70% | 100% | 0.993 | 0.120 |")
    assert lines[2].endswith("| 0.960 | n/a |")
    assert lines[3].startswith("| sparsify | sparsify |") and "| 0.300 |" in lines[3]
    assert "The model's own neurons: sparse probing top-1 0.600, top-5 0.800" in table
    assert "| topk | 64 | 0.0500 | 10% | 50% | 1.2 | 1.00 | 0.200 |" in bench_archs.render_sweep(fake_report())


def test_paste_into_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{bench_archs.README_BEGIN}\nold table\n{bench_archs.README_END}\nafter\n")
    assert bench_archs.paste_into(readme, fake_report())
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{bench_archs.README_END}\nafter\n")
    assert "old table" not in text and "| topk | lmmscope |" in text and "Width sweep" in text
    assert bench_archs.paste_into(readme, fake_report()) and readme.read_text() == text  # idempotent
    other = tmp_path / "other.md"
    other.write_text("no markers\n")
    assert not bench_archs.paste_into(other, fake_report()) and other.read_text() == "no markers\n"


def test_unknown_names_are_refused_with_the_choices():
    from interp.pipeline.benchmark import BenchmarkConfig

    with pytest.raises(ValueError, match="unknown SAE 'magic'; choose from topk, batchtopk, matryoshka, jumprelu, "
                                         "relu, sae-lens, sparsify"):
        BenchmarkConfig(archs=("topk", "magic"))
    with pytest.raises(ValueError, match="the width sweep runs our architectures only"):
        BenchmarkConfig(sweep_archs=("sparsify",))
    with pytest.raises(ValueError, match="--seeds compares topk and matryoshka: add matryoshka to --archs"):
        BenchmarkConfig(archs=("topk", "batchtopk"), seeds=3)
    with pytest.raises(ValueError, match="no ground truth for world 'v9'; known: shapes"):
        bench_archs.Scored.of(None, "v9")


@pytest.mark.slow
def test_benchmark_scores_ours_and_the_other_trainers(shapes_run, tmp_path):
    from interp.pipeline.benchmark import BenchmarkConfig, run_benchmark

    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{bench_archs.README_BEGIN}\n{bench_archs.README_END}\n")
    cfg = BenchmarkConfig(run=str(tmp_path / "bench"), cache=str(shapes_run / "activations.h5"),
                          archs=("topk", "matryoshka", "sae-lens", "sparsify"), d_sae=32, k=4, steps=60,
                          batch_size=256, widths=(16, 32), sweep_archs=("matryoshka",), sweep_steps=30,
                          ce_samples=4, explain=False, methods_features=4, methods_questions=6, crossmodal=False,
                          seeds=2, readme=str(readme))  # the cross-modal section has its own test (test_crossmodal.py)
    report = run_benchmark(cfg)
    on_disk = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert on_disk["architectures"].keys() == {"topk", "matryoshka", "sae-lens", "sparsify"}
    for name, r in on_disk["architectures"].items():
        for key in KEYS:
            assert isinstance(r[key], (int, float)) and r[key] == r[key], (name, key)
        assert 0 <= r["absorption"] <= 1 and -1 <= r["mcc"] <= 1 and 0 <= r["sparse_probing_top1"] <= 1
        assert "ce_loss_recovered" in r, name
        assert set(r["f1"]) == set(on_disk["concepts"]) == set(r["per_concept"])
    assert on_disk["architectures"]["sae-lens"]["trainer"] == "sae-lens"
    assert on_disk["architectures"]["sparsify"]["architecture"] == "topk"
    assert on_disk["architectures"]["matryoshka"]["architecture"] == "matryoshka"
    assert set(on_disk["width_sweep"]["matryoshka"]) == {"16", "32"}
    em, sm = on_disk["explanation_methods"], on_disk["steering_methods"]  # on topk, the first of ours
    assert em["sae"] == sm["sae"] == "topk" and 0 < em["features"] <= 4
    for m in ("ours", "reference", "contrastive"):
        assert 0 <= em[m]["explanation_accuracy_all"] <= 1 and "explanations" not in em[m]
    for m in ("ours", "reference"):
        assert {"flip_rate", "collateral", "coherence"} <= set(sm[m]), m
    seeds = on_disk["seeds"]  # seed 1: topk (the methods' SAE) and matryoshka retrained, the methods again
    assert seeds["seeds"] == [0, 1] and [p["seed"] for p in seeds["per_seed"]] == [0, 1]
    assert seeds["per_seed"][0]["absorption"]["topk"] == on_disk["architectures"]["topk"]["absorption"]
    again_seed = seeds["per_seed"][1]
    assert 0 <= again_seed["absorption"]["matryoshka"] <= 1 and 0 <= again_seed["explanation"]["contrastive"] <= 1
    assert again_seed["steering"]["ours"]["flip_rate"] is not None
    assert (tmp_path / "bench" / "seed-1" / "matryoshka" / "sae" / "cfg.json").exists()
    assert set(seeds["target_met_at_every_seed"]) == {"explanation_contrastive_minus_reference",
                                                      "steering_flip_ours_minus_reference",
                                                      "steering_collateral_ours_over_reference",
                                                      "absorption_topk_minus_matryoshka"}
    assert on_disk == json.loads(json.dumps(report))
    text = (tmp_path / "bench" / "report.md").read_text()
    assert "| sparsify | sparsify |" in text and "## Width sweep" in text
    for fig in ("recovery", "absorption", "width_sweep"):
        assert (tmp_path / "bench" / f"{fig}.html").exists() and (tmp_path / "bench" / f"{fig}.png").exists()
    assert "| sae-lens | sae-lens |" in readme.read_text() and "| contrastive |" in readme.read_text()
    assert "## The reference work's methods against ours" in text and "## Across SAE training seeds" in text
    # a re-run reads the trained SAEs back instead of training them again
    again = run_benchmark(cfg)
    assert again["architectures"]["topk"]["fvu"] == report["architectures"]["topk"]["fvu"]


def test_the_methods_sections_pick_one_of_our_saes_and_render_both_tables(tmp_path):
    from interp.pipeline.benchmark import BenchmarkConfig

    assert BenchmarkConfig().methods_arch == "batchtopk"
    assert BenchmarkConfig(archs=("topk", "sparsify")).methods_arch == "topk"
    assert BenchmarkConfig(archs=("sparsify",), methods=False).methods_arch is None
    with pytest.raises(ValueError, match="the methods sections need one of our architectures"):
        BenchmarkConfig(archs=("sparsify",))
    with pytest.raises(ValueError, match="--methods-arch relu is not"):
        BenchmarkConfig(archs=("topk",), methods_arch="relu")
    explained = {m: {"explanation_accuracy_all": a, "explanation_accuracy": 0.5, "detection_balanced_accuracy_all": 0.7,
                     "iou": 0.2, "explained_fraction": 0.25} for m, a in
                 (("ours", 0.05), ("reference", 0.0), ("contrastive", 0.23))}
    ref = {"flip_rate": 0.4, "collateral": 0.3, "collateral_kl": 1.5, "coherence": 0.6}
    ours = {"flip_rate": 0.8, "collateral": 0.05, "collateral_kl": 0.2, "coherence": 0.95}
    steered = {"reference": {**ref, "per_kind": {"color": ref}},
               "ours": {**ours, "variant": {"color": "clamp-image"}, "per_kind": {"color": ours}}}
    report = {"explanation_methods": {"sae": "batchtopk", "features": 40, **explained},
              "steering_methods": {"sae": "batchtopk", **steered}, "architectures": {}}
    text = bench_archs.render_methods(report)
    assert "| contrastive | 0.230 | 50% | 0.700 | 0.200 | 25% |" in text
    assert "| color | reference | 40% | 0.300 | 1.500 | 60% |" in text and "| color | ours (clamp-image) | 80% |" in text
    assert "| all | ours (color: clamp-image) | 80% | 0.050 | 0.200 | 95% |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{bench_archs.README_BEGIN}\nold\n{bench_archs.README_END}\ny\n")
    assert bench_archs.paste_into(readme, report)
    assert "old" not in readme.read_text() and "| color | ours (clamp-image) |" in readme.read_text()
    assert bench_archs.render_methods({"architectures": {}}) == ""


def test_seed_margins_report_the_mean_and_the_worst_seed_and_a_missing_seed_fails_its_target():
    from interp.pipeline.benchmark import seed_margins
    from steering.methods import target

    def seed(contrastive, reference, flips, collaterals, absorptions):
        steering = {"ours": {"flip_rate": flips[0], "collateral": collaterals[0]},
                    "reference": {"flip_rate": flips[1], "collateral": collaterals[1]}}
        return {"explanation": {"ours": 0.1, "reference": reference, "contrastive": contrastive},
                "steering": steering, "steering_target": target(steering["ours"], steering["reference"]),
                "absorption": {"topk": absorptions[0], "matryoshka": absorptions[1]}}

    m = seed_margins([seed(0.3, 0.0, (0.6, 0.2), (0.1, 0.6), (0.08, 0.03)),
                      seed(0.15, 0.1, (0.5, 0.5), (0.2, 0.3), (0.05, 0.06))])
    assert m["explanation_contrastive_minus_reference"] == {"mean": 0.175, "worst": 0.05, "n": 2}
    assert m["steering_collateral_ours_over_reference"]["worst"] == pytest.approx(0.6667, abs=1e-4)
    assert m["absorption_topk_minus_matryoshka"]["worst"] == pytest.approx(-0.01)
    met = m["target_met_at_every_seed"]
    assert met == {"explanation_contrastive_minus_reference": False, "steering_flip_ours_minus_reference": True,
                   "steering_collateral_ours_over_reference": False, "absorption_topk_minus_matryoshka": False}
    lacking = seed_margins([seed(0.3, 0.0, (0.6, 0.2), (0.1, 0.6), (0.08, 0.03)),
                            seed(0.3, None, (0.6, 0.2), (0.1, 0.6), (0.08, 0.03))])
    assert lacking["explanation_contrastive_minus_reference"]["n"] == 1
    assert lacking["target_met_at_every_seed"]["explanation_contrastive_minus_reference"] is False
    assert lacking["target_met_at_every_seed"]["absorption_topk_minus_matryoshka"] is True
