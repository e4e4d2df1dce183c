import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from interp.shapes.organisms import ORGANISMS, UnknownOrganismError, organism_path
from interp.shapes.organisms.build import SPECS, build_processor, build_tokenizer
from interp.shapes.organisms.eval import evaluate, selection, selection_items
from interp.shapes.organisms.train import FOCUS_HEADS, Batcher, TrainConfig, focus_loss, pixel_tensor, train
from interp.shapes.world import NUMBER_WORDS, SUBJECT_TASKS, WorldConfig, sample_scene

# regression floors: a little under what the shipped weights measure (docs/organisms.md), on 150 held-out
# questions each. They are short of issue 12's target (0.95 on every task), which the strict xfails below state.
SUBJECT_MIN = {"color": 0.9, "shape": 0.7, "size": 0.9, "fill": 0.9, "at": 0.55, "where": 0.85, "count": 0.95,
               "exists": 0.85, "relation": 0.55, "letter": 0.85}
EXPLAINER_MIN = {"region": 0.6, "patch": 0.6, "color": 0.9, "shape": 0.75}
TARGET = 0.95


@pytest.mark.parametrize("name", list(ORGANISMS))
def test_organisms_load_like_hub_models(name):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    path = organism_path(name)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.dtype == torch.float32
    scene = sample_scene(WorldConfig(), 0, "test")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many objects are there ?"}]}]
    inputs = processor(images=scene.render(), text=processor.apply_chat_template(msgs, add_generation_prompt=True),
                       return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == WorldConfig().patches ** 2 == 64
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == NUMBER_WORDS[len(scene.objects)]


def test_shipped_weights_fit_the_budget():
    total = sum((organism_path(n) / "model.safetensors").stat().st_size for n in ORGANISMS)
    assert total <= 60 * 2**20, f"shipped weights are {total / 2**20:.1f} MB"


@pytest.fixture(scope="module")
def subject_accuracy(subject):
    return evaluate(*subject, tuple(SUBJECT_MIN), n=150, split="test")


@pytest.fixture(scope="module")
def explainer_accuracy(explainer):
    return evaluate(*explainer, tuple(EXPLAINER_MIN), n=150, split="test")


def test_subject_accuracy(subject_accuracy):
    assert all(subject_accuracy[t] >= SUBJECT_MIN[t] for t in SUBJECT_MIN), subject_accuracy


def test_explainer_accuracy(explainer_accuracy):
    assert all(explainer_accuracy[t] >= EXPLAINER_MIN[t] for t in EXPLAINER_MIN), explainer_accuracy


def test_subject_selects_the_object_a_colour_word_names(subject):
    """The failure of every subject before the focus loss: asked the shape of the X-coloured one of two
    objects, it named either object's shape about equally often (0.46 / 0.44)."""
    sel = selection(*subject, n=100, split="val")
    assert sel["select_by_color_right"] >= 0.75 and sel["select_by_color_other"] <= 0.1, sel
    assert sel["select_by_shape_right"] >= 0.85, sel


@pytest.mark.xfail(strict=True, reason="issue 12 is open: the subject reads shapes (0.835), what is at P (0.65) and "
                                       "relations (0.645) below 0.95")
def test_subject_meets_the_issue_target(subject_accuracy):
    assert min(subject_accuracy.values()) >= TARGET, subject_accuracy


@pytest.mark.xfail(strict=True, reason="issue 12 is open: the explainer describes 0.71 of held-out regions exactly (0.72 of "
                                       "single patches), not 0.9")
def test_explainer_meets_the_issue_target(explainer_accuracy):
    assert explainer_accuracy["region"] >= 0.9 and min(explainer_accuracy.values()) >= TARGET, explainer_accuracy


def test_unknown_organism_lists_known_ones():
    with pytest.raises(UnknownOrganismError, match="shapes-subject, shapes-explainer"):
        organism_path("shapes-giant")


def test_training_inputs_match_the_processor():
    processor = build_processor()
    images = [sample_scene(WorldConfig(), i).render() for i in range(3)]
    ref = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_tensor(images), ref)
    tok = build_tokenizer()
    text = "what color is the circle ?"
    assert tok(text)["input_ids"] == [tok.bos_token_id] + Batcher(TrainConfig(), WorldConfig()).ids(text)


def test_focus_targets_sit_on_the_answer_positions_and_score_attention():
    """The focus loss's targets: at every position whose output predicts an answer word, where the question's
    object is; a head attending exactly there scores lower than one attending uniformly."""
    assert "focus" not in Batcher(TrainConfig(batch_images=2), WorldConfig()).batch(0)  # off: nothing built
    batcher = Batcher(TrainConfig(batch_images=6, attention_supervision=1.0), WorldConfig())
    batch = batcher.batch(0)
    focus, ids, labels = batch["focus"], batch["input_ids"], batch["labels"]
    assert focus.shape == (*ids.shape[:1], FOCUS_HEADS, ids.shape[1], 64)
    rows = focus.sum(-1)
    assert torch.allclose(rows[rows > 0], torch.ones(()))
    answer_word = (labels[:, 1:] != -100) & (ids[:, 1:] != batcher.tok.eos_token_id)
    supervised = rows[:, 0, :-1] > 0
    assert supervised.any() and not (supervised & ~answer_word).any()  # only answer-predicting positions

    cue = batch["cue"]  # the text hop: the question's words naming each thing, at the same rows
    cue_rows = cue.sum(-1)
    assert torch.allclose(cue_rows[cue_rows > 0], torch.ones(())) and not ((cue_rows > 0) & (rows == 0)).any()
    tokens = batcher.tok.convert_ids_to_tokens
    named = {w for i, h, r in (cue_rows > 0).nonzero().tolist() for w in tokens(ids[i, cue[i, h, r] > 0].tolist())}
    assert named and named <= set(" ".join(WorldConfig().colors + WorldConfig().shapes).split()) | {"top", "bottom",
                                                                                                   "left", "right"}

    L = ids.shape[1]
    exact = torch.full((ids.shape[0], 4, L, L), 1e-9)
    exact[:, :FOCUS_HEADS, :, 1:65] = focus
    uniform = torch.zeros(ids.shape[0], 4, L, L)
    uniform[:, :, :, 1:65] = 1 / 64
    assert focus_loss([exact] * 8, focus, (5, 6)) < focus_loss([uniform] * 8, focus, (5, 6)) - 1
    entropy = -(focus * torch.log(focus + 1e-6)).sum(-1)[rows > 0].mean()
    assert torch.isclose(focus_loss([exact] * 8, focus, (5,)), entropy, atol=1e-3)
    on_cue = exact.clone()
    on_cue[:, :FOCUS_HEADS] = cue + 1e-9  # layers 4-7 attend to the naming words, layers 0-3 to the objects
    layers = [exact] * 4 + [on_cue] * 4
    off = focus_loss(layers, focus, (1,), cue=cue, cue_layers=(2,))
    assert off > focus_loss(layers, focus, (1,), cue=cue, cue_layers=(6,)) + 1


@pytest.mark.parametrize("attention_supervision", [0.0, 0.5])
def test_training_resumes_exactly(tmp_path, monkeypatch, attention_supervision):
    cfg = TrainConfig(which="subject", steps=6, batch_images=4, vision_pretrain_steps=2, checkpoint_every=3,
                      eval_every=1000, eval_n=2, warmup=2, attention_supervision=attention_supervision)
    straight = train(cfg, tmp_path / "straight", threads=1)

    real = Batcher.batch

    def dies_at_step_4(self, step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return real(self, step)

    monkeypatch.setattr(Batcher, "batch", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", threads=1)
    monkeypatch.setattr(Batcher, "batch", real)
    resumed = train(cfg, tmp_path / "resumed", threads=1)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "train_log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6], "a resumed run must log each step once"
    focus_logged = ["focus_loss" in json.loads(line) for line in open(tmp_path / "resumed" / "train_log.jsonl")]
    assert all(focus_logged) == bool(attention_supervision) and any(focus_logged) == bool(attention_supervision)
    assert "eager" not in (straight / "config.json").read_text()  # trained with eager attention, saved without
    assert not [k for k in a if "readout" in k], "the cue readout trains beside the model and is not shipped"

    other = TrainConfig(**{**cfg.__dict__, "lr": 1e-4})
    with pytest.raises(ValueError, match=r"checkpoint .* was made with other settings \(train_config.lr: recorded "
                                         r"0.002, now 0.0001\): use another --out or delete it"):
        train(other, tmp_path / "resumed", threads=1)


@pytest.mark.parametrize("which", ["subject", "explainer"])
def test_shipped_organisms_were_trained_with_the_recipe(which):
    """`interp organism train --which W` retrains the shipped organism: its recorded config is the recipe's."""
    from dataclasses import asdict

    from interp.shapes.organisms.train import RECIPES

    recorded = json.loads((organism_path(f"shapes-{which}") / "training.json").read_text())["train_config"]
    assert recorded == json.loads(json.dumps(asdict(RECIPES[which])))


def test_specs_are_what_the_docs_say():
    sub, exp = SPECS["subject"], SPECS["explainer"]
    assert sub.text_layers >= 8, "the subject needs a middle layer that still reads the image"
    assert exp.text_layers >= sub.text_layers and exp.text_width > sub.text_width  # the explainer is larger
    assert "region" in exp.tasks and set(sub.tasks) == set(SUBJECT_TASKS)
    # the one-patch regions the explain stage asks about are measured, not trained on
    assert exp.eval_tasks == (*exp.tasks, "patch") and "patch" not in exp.tasks and sub.eval_tasks == sub.tasks


@pytest.mark.parametrize("task", ["shape", "color"])
def test_selection_items_ask_one_of_two_distinguishable_objects(task):
    for scene, qa, right, other in selection_items(task, 30, split="val"):
        assert len(scene.objects) == 2 and right == qa.answer and right != other
        a, b = scene.objects
        assert a.color != b.color and a.shape != b.shape


def test_image_token_reach_rejects_a_layer_the_model_lacks():
    from interp.shapes.organisms.build import build_model
    from interp.shapes.organisms.eval import image_token_reach

    with pytest.raises(ValueError, match="layer 8 is not an LLM layer of this model; it has layers 0 to 7"):
        image_token_reach(build_model(SPECS["subject"]), build_processor(), 8)


def test_vision_pretraining_stops_at_its_gate_and_resumes_stopped(tmp_path):
    from interp.shapes.organisms.build import build_model
    from interp.shapes.organisms.train import CellHeads, vision_pretrain

    world = WorldConfig(striped_outline=True)
    cfg = TrainConfig(which="subject", vision_pretrain_steps=50, vision_check_every=2, vision_gate_shape=0.0)
    model = build_model(SPECS["subject"], world, seed=0)
    batcher = Batcher(cfg, world)
    calls = []
    real = Batcher.cell_batch
    batcher.cell_batch = lambda step, n=64, split="train": calls.append((step, split)) or real(batcher, step, n, split)
    held_out = vision_pretrain(model, batcher, cfg, tmp_path / "vision")
    train_steps = [s for s, split in calls if split == "train"]
    assert train_steps == [0, 1], "a gate of 0 is reached at the first held-out check"
    assert set(held_out) == {"color", "shape", "size", "fill"} and all(0 <= v <= 1 for v in held_out.values())
    calls.clear()
    again = vision_pretrain(build_model(SPECS["subject"], world, seed=0), batcher, cfg, tmp_path / "vision")
    assert again == held_out and calls == [], "a gated pretraining resumes as finished"
    assert CellHeads(8, world).pool.shape == (4, 64)


def test_patch_targets_name_the_object_covering_each_patch():
    from dataclasses import replace

    from interp.shapes import world as w
    from interp.shapes.organisms.train import PATCH_OBJECT, PatchHeads

    world = WorldConfig(striped_outline=True)
    cfg = TrainConfig(which="subject", vision_targets="patch")
    batcher = Batcher(cfg, world)
    x, y = batcher.targets(3, 4, split="val")
    assert x.shape == (4, 3, 64, 64) and y["shape"].shape == (4, 64)
    dense = replace(world, min_objects=cfg.vision_min_objects)
    for i in range(4):
        scene = w.sample_scene(dense, 10_000_000 + 3 * 4 + i, "val", cfg.seed)
        fracs = np.stack([f.flatten() for f in scene.object_patch_fractions()])
        for t in range(64):
            if fracs[:, t].max() < PATCH_OBJECT:
                assert y["occupied"][i, t] == 0 and y["shape"][i, t] == -100
            else:
                owner = scene.objects[int(fracs[:, t].argmax())]
                assert y["occupied"][i, t] == 1
                assert world.shapes[int(y["shape"][i, t])] == owner.shape
                assert world.colors[int(y["color"][i, t])] == owner.color
    heads = PatchHeads(16, world)
    loss, acc = heads(torch.randn(4, 64, 16), y)
    assert torch.isfinite(loss) and set(acc) == {"cell", "color", "shape", "size", "fill"}
    assert heads.cell_of.tolist()[:8] == [0, 0, 0, 0, 1, 1, 1, 1] and heads.cell_of[-1] == 3
    with pytest.raises(ValueError, match="vision_targets 'pixel': use 'cell', 'patch', 'region'"):
        Batcher(TrainConfig(vision_targets="pixel"), world).targets(0, 1)


def test_region_targets_add_part_and_background_to_the_patch_targets():
    """The explainer's tower (`vision_targets="region"`) also learns what a region description names beyond
    the object: its part, or the empty background's tone and texture."""
    from dataclasses import replace

    from interp.shapes import world as w
    from interp.shapes.organisms.train import PATCH_OBJECT, PatchHeads

    world = WorldConfig()
    cfg = TrainConfig(which="explainer", vision_targets="region")
    _, plain = Batcher(replace(cfg, vision_targets="patch"), world).targets(5, 3, split="val")
    _, y = Batcher(cfg, world).targets(5, 3, split="val")
    assert set(y) == set(plain) | {"part", "tone", "texture"} and "part" not in plain
    assert all(torch.equal(y[k], plain[k]) for k in plain), "the object targets are the patch recipe's"
    dense = replace(world, min_objects=cfg.vision_min_objects)
    seen = {"interior": 0, "edge": 0, "background": 0}
    for i in range(3):
        scene = w.sample_scene(dense, 10_000_000 + 5 * 3 + i, "val", cfg.seed)
        fracs = np.stack([f.flatten() for f in scene.object_patch_fractions()])
        for t in range(64):
            part, tone, texture = (int(y[k][i, t]) for k in ("part", "tone", "texture"))
            if fracs[:, t].max() >= PATCH_OBJECT:
                want = "interior" if fracs[:, t].max() >= w.INTERIOR else "edge"
                assert w.PARTS[part] == want
                seen[want] += 1
            else:
                assert part == -100
            if fracs[:, t].sum() < w.EMPTY:
                assert list(w.TONES)[tone] == scene.tone and w.TEXTURES[texture] == scene.texture
                seen["background"] += 1
            else:
                assert tone == texture == -100
    assert min(seen.values()) > 0, seen
    heads = PatchHeads(16, world, region=True)
    loss, acc = heads(torch.randn(3, 64, 16), y)
    assert torch.isfinite(loss) and {"part", "tone", "texture"} <= set(acc)


def test_sincos_positions_are_distinct_and_scaled():
    from interp.shapes.organisms.build import build_model
    from interp.shapes.organisms.train import init_positions

    world = WorldConfig()
    model = build_model(SPECS["subject"], world, seed=0)
    init_positions(model, TrainConfig(position_init="sincos", position_init_std=0.5), world)
    pe = model.model.vision_tower.embeddings.position_embedding.weight.detach()
    patches = pe[1:]
    assert torch.count_nonzero(pe[0]) == 0, "the class token's position stays at zero"
    assert abs(float(patches.std()) - 0.5) < 1e-3
    dist = torch.cdist(patches, patches) + torch.eye(len(patches)) * 1e9
    assert float(dist.min()) > 0.1, "every patch position has its own embedding"
    # neighbours are closer than far cells: the embedding is smooth in both axes
    assert float(dist[0, 1]) < float(dist[0, 7]) and float(dist[0, 8]) < float(dist[0, 56])
    with pytest.raises(ValueError, match="position_init 'learned'"):
        init_positions(model, TrainConfig(position_init="learned"), world)


def test_one_hot_mse_is_zero_on_the_code_and_skips_missing_targets():
    from interp.shapes.organisms.train import HEAD_LOSSES, PatchHeads, one_hot_mse

    y = torch.tensor([[2, -100], [0, 1]])
    code = torch.nn.functional.one_hot(y.clamp(min=0), 3).float()
    assert float(one_hot_mse(code, y)) == 0.0
    code[0, 1] = 5.0  # a row without a target: ignored
    assert float(one_hot_mse(code, y)) == 0.0
    code[1, 0] = torch.tensor([0.0, 1.0, 0.0])  # wrong by 1 in two entries, one of three rows
    assert float(one_hot_mse(code, y)) == pytest.approx(2 / 3)
    assert float(one_hot_mse(code, torch.full_like(y, -100))) == 0.0
    # unlike softmax, a larger margin in the right direction is not free
    confident = 1e4 * torch.eye(3)[None]
    assert float(HEAD_LOSSES["ce"](confident, torch.arange(3)[None])) == 0.0
    assert float(HEAD_LOSSES["mse"](confident, torch.arange(3)[None])) > 1e7
    heads = PatchHeads(16, WorldConfig(), "mse")
    _, ys = Batcher(TrainConfig(vision_targets="patch"), WorldConfig()).targets(0, 2, split="val")
    loss, _ = heads(torch.randn(2, 64, 16, requires_grad=True), ys)
    assert torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(ValueError, match="vision_head_loss 'hinge': use 'ce' or 'mse'"):
        TrainConfig(vision_head_loss="hinge")


def test_lm_stage_can_freeze_the_tower_and_projector():
    from interp.shapes.organisms.build import build_model
    from interp.shapes.organisms.train import make_optimizer

    model = build_model(SPECS["subject"], WorldConfig(), seed=0)
    opt = make_optimizer(model, TrainConfig(vision_lr_scale=0.0, projector_lr_scale=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("language_model" in n or "lm_head" in n for n in moved), sorted(moved)[:5]
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in moved)
    lrs = [g["lr"] for g in make_optimizer(model, TrainConfig(lr=1.0, vision_lr_scale=0.3)).param_groups]
    assert lrs == [1.0, 0.3, 1.0], "by default the projector trains with the LLM, the tower at 0.3x"
