"""`interp crossmodal`: is the feature that fires on red patches the one that fires on the word "red"?

For every concept of the world that has a word, three searches over the SAE's features on a cache
that holds image patches and text tokens together (`interp cache --data shapes:train:qa --roles
image_patch,text,answer`):

- the best feature on image patches of the concept (F1 at its best threshold against the
  ground-truth patch labels, as `interp recovery`);
- the best feature on text tokens naming it (a token names a concept when it is, or is part of
  an occurrence of, the concept's word);
- the best shared feature: the one whose weaker F1 of the two is highest. The concept is
  cross-modal when that weaker F1 reaches `f1_min` (each modality at its own threshold: the
  activation scale on text and on patches may differ).

The searches work on arrays (`crossmodal_concepts`) and never build a [rows, d_sae] array of the
whole cache: F1 at "fires at all" picks candidate features chunk by chunk (one matrix product per
chunk, as recovery), and only the candidates' columns are kept for the threshold search. Ground
truth comes in as `TokenConcepts` (cache rows and their labels), so another world only needs
its own labels: `image_truth` and `word_truth` are the two places that know the world.

RUN/crossmodal.json (format `lmmscope.crossmodal/1`, docs/formats.md) is written here and read back
with `load_crossmodal`; `text_matched` gives the word-matched features the text explanations are
scored on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from interp.infra.cli_config import Command, positional
from interp.infra.layout import RunLayout
from interp.shapes.concepts import best_threshold, contiguous_runs, f1_of_counts
from interp.shapes.ground_truth import TokenConcepts

CROSSMODAL_FORMAT = "lmmscope.crossmodal/1"

Chunks = Callable[[], Iterable[np.ndarray]]
"""A fresh pass over the SAE's activations [n, d_sae] of the labelled rows, in the order of the labels."""


# ---------------------------------------------------------------- on arrays


@dataclass
class Detector:
    """One feature detecting one concept on one modality's rows."""

    feature: int
    f1: float
    precision: float
    recall: float
    threshold: float  # it detects the concept where its activation is >= this


@dataclass
class CrossModalConcept:
    concept: str
    word: str
    image: Detector  # the best feature on the concept's image patches
    text: Detector  # the best feature on the text tokens naming it
    shared_feature: int  # the feature whose weaker F1 over the two modalities is highest
    shared_image: Detector
    shared_text: Detector
    image_positives: int  # patches the concept covers
    text_positives: int  # text tokens naming it

    @property
    def shared_f1(self) -> float:
        return min(self.shared_image.f1, self.shared_text.f1)


def fire_f1(chunks: Chunks, labels: np.ndarray) -> np.ndarray:
    """[concepts, d_sae] F1 of "the feature fires" (> 0) for each concept, one pass."""
    tp = fired = None
    s = 0
    y = labels.astype(np.float64)
    for acts in chunks():
        on = (acts > 0).astype(np.float64)
        part = y[s: s + len(on)].T @ on
        tp = part if tp is None else tp + part
        fired = on.sum(0) if fired is None else fired + on.sum(0)
        s += len(on)
    if tp is None:
        raise ValueError("no labelled rows to score features on")
    return np.stack([f1_of_counts(tp[j], fired, labels[:, j].sum())[0] for j in range(labels.shape[1])])


def _columns(chunks: Chunks, pool: np.ndarray) -> np.ndarray:
    return np.concatenate([acts[:, pool] for acts in chunks()])


def _detector(values: np.ndarray, labels: np.ndarray, feature: int) -> Detector:
    f1, precision, recall, threshold = best_threshold(values, labels)
    return Detector(int(feature), round(f1, 4), round(precision, 4), round(recall, 4), float(threshold))


def crossmodal_concepts(image_chunks: Chunks, image_labels: np.ndarray, text_chunks: Chunks, text_labels: np.ndarray,
                        concepts: tuple[str, ...], words: tuple[str, ...] | None = None,
                        candidates: int = 8) -> list[CrossModalConcept]:
    """Per concept, the best image feature, the best text feature and the best shared one. `*_labels`
    [rows, concepts] bool in the order the chunks yield rows. Candidates per concept: the `candidates`
    best features by fires-at-all F1 on each modality and by their weaker one."""
    img_f1, txt_f1 = fire_f1(image_chunks, image_labels), fire_f1(text_chunks, text_labels)
    both = np.minimum(img_f1, txt_f1)
    pool = np.unique(np.concatenate([np.argsort(-m, axis=1)[:, :candidates] for m in (img_f1, txt_f1, both)], 1))
    img_cols, txt_cols = _columns(image_chunks, pool), _columns(text_chunks, pool)
    out = []
    for j, concept in enumerate(concepts):
        yi, yt = image_labels[:, j], text_labels[:, j]
        on_image = [_detector(img_cols[:, i], yi, f) for i, f in enumerate(pool)]
        on_text = [_detector(txt_cols[:, i], yt, f) for i, f in enumerate(pool)]
        best_i = max(range(len(pool)), key=lambda i: on_image[i].f1)
        best_t = max(range(len(pool)), key=lambda i: on_text[i].f1)
        shared = max(range(len(pool)), key=lambda i: (min(on_image[i].f1, on_text[i].f1), on_image[i].f1 + on_text[i].f1))
        out.append(CrossModalConcept(concept, (words or concepts)[j], on_image[best_i], on_text[best_t], int(pool[shared]),
                                     on_image[shared], on_text[shared], int(yi.sum()), int(yt.sum())))
    return out


# ---------------------------------------------------------------- the report (RUN/crossmodal.json)


@dataclass
class CrossModalReport:
    concepts: list[CrossModalConcept]
    f1_min: float = 0.9
    format: str = CROSSMODAL_FORMAT
    extra: dict = field(default_factory=dict)  # how it was made: layer, SAE fingerprint, rows

    @property
    def cross_modal(self) -> list[str]:
        """The concepts one feature detects at F1 >= f1_min on both modalities."""
        return [c.concept for c in self.concepts if c.shared_f1 >= self.f1_min]

    @property
    def cross_modal_fraction(self) -> float:
        return round(len(self.cross_modal) / max(len(self.concepts), 1), 4)

    def text_matched(self, f1_min: float | None = None) -> dict[int, list[tuple[str, float]]]:
        """feature -> [(concept word, F1)] for every concept whose best text feature reaches f1_min on the
        tokens naming it (the features a text explanation should name a word for)."""
        f1_min = self.f1_min if f1_min is None else f1_min
        out: dict[int, list[tuple[str, float]]] = {}
        for c in self.concepts:
            if c.text.f1 >= f1_min:
                out.setdefault(c.text.feature, []).append((c.word, c.text.f1))
        return out

    def to_json(self) -> dict:
        return {"format": self.format, "cross_modal_fraction": self.cross_modal_fraction, "f1_min": self.f1_min,
                "cross_modal": self.cross_modal,
                "concepts": [{**asdict(c), "shared_f1": c.shared_f1, "cross_modal": c.shared_f1 >= self.f1_min}
                             for c in self.concepts], **self.extra}


def write_crossmodal(report: CrossModalReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=1))
    return path


def load_crossmodal(path: str | Path) -> CrossModalReport:
    """The one reader of RUN/crossmodal.json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no cross-modal report at {path}: make it with `interp crossmodal {path.parent}`")
    raw = json.loads(path.read_text())
    if raw.get("format") != CROSSMODAL_FORMAT:
        raise ValueError(f"{path} is not an lmmscope cross-modal report (format {raw.get('format')!r}, expected "
                         f"{CROSSMODAL_FORMAT!r}): re-run `interp crossmodal {path.parent}`")
    concepts = []
    for c in raw["concepts"]:
        det = {k: Detector(**c[k]) for k in ("image", "text", "shared_image", "shared_text")}
        concepts.append(CrossModalConcept(c["concept"], c["word"], det["image"], det["text"], c["shared_feature"],
                                          det["shared_image"], det["shared_text"], c["image_positives"],
                                          c["text_positives"]))
    known = {"format", "cross_modal_fraction", "f1_min", "cross_modal", "concepts"}
    return CrossModalReport(concepts, float(raw["f1_min"]), extra={k: v for k, v in raw.items() if k not in known})


# ---------------------------------------------------------------- ground truth for a cache


def image_truth(reader, world=None, threshold: float = 0.05) -> TokenConcepts:
    """Labels of the cache's image patches, as recovery's (`TokenConcepts.labels`: an object's concept covers
    > `threshold` of a patch's box, a background concept most of it; another world passes its own TokenConcepts)."""
    from interp.cache.format import is_image_patch
    from interp.shapes.ground_truth import token_concepts
    from interp.shapes.world import WorldConfig

    gt = token_concepts(reader, world or WorldConfig(), with_object=False)
    keep = is_image_patch(reader.tokens["role"][gt.rows])
    return TokenConcepts(gt.concepts, gt.labels(threshold)[keep].astype(np.float64), gt.rows[keep])


WORDED_KINDS = ("color", "shape", "size", "fill", "cell")
"""Kinds of world concepts that questions and answers name with a word ("red", "letter k", "top left")."""


def world_words(concepts) -> dict[str, str]:
    """concept -> the words naming it in text, for the concepts questions and answers can name."""
    return {c: c.split(":", 1)[1] for c in concepts if c.split(":", 1)[0] in WORDED_KINDS}


def word_variants(tokenizer, word: str) -> list[list[int]]:
    """The token-id sequences a word can appear as in text (alone, and after a space)."""
    out = []
    for text in (word, " " + word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in out and tokenizer.unk_token_id not in ids:
            out.append(ids)
    return out


def word_truth(reader, tokenizer, words: dict[str, str]) -> TokenConcepts:
    """Labels of the cache's text rows: the row's token is (part of) an occurrence of the concept's word.
    `words`: concept -> its word. Occurrences are found in each sample's text rows in position order."""
    from interp.cache.format import is_text

    tokens = reader.tokens
    rows = np.flatnonzero(is_text(tokens["role"]))
    if not len(rows):
        raise ValueError("this cache holds no text rows: cache with --roles image_patch,text,answer (and a data "
                         "source with text, e.g. --data shapes:train:qa --prompt-template '{image} {text}')")
    ids = tokens["token_id"][rows].astype(np.int64)
    sample = tokens["sample"][rows]
    labels = np.zeros((len(rows), len(words)), np.float64)
    for j, word in enumerate(words.values()):
        for variant in word_variants(tokenizer, word):
            if len(variant) == 1:
                labels[ids == variant[0], j] = 1.0
                continue
            n = len(variant)
            for i in range(len(ids) - n + 1):  # a multi-token word: contiguous ids within one sample
                if ids[i] == variant[0] and sample[i] == sample[i + n - 1] and list(ids[i:i + n]) == variant:
                    labels[i:i + n, j] = 1.0
    return TokenConcepts(tuple(words), labels, rows)


def _chunks(sae, reader, rows: np.ndarray, chunk_rows: int = 32768) -> Chunks:
    def run():
        with torch.no_grad():
            for s in range(0, len(rows), chunk_rows):
                x = torch.cat([reader.read(int(a), int(b)) for a, b in contiguous_runs(rows[s: s + chunk_rows])])
                yield sae.encode(x.to(sae.device, sae.dtype)).float().cpu().numpy()
    return run


def crossmodal(sae, reader, tokenizer, f1_min: float = 0.9, words: dict[str, str] | None = None,
               image_gt: TokenConcepts | None = None, candidates: int = 8) -> CrossModalReport:
    """The cross-modal report of `sae` over `reader`'s cache. `words`: concept -> word (default: the
    world's concepts that text names, `world_words`); `image_gt`: the patches' labels (default: the
    shapes world's)."""
    sae.check_width(torch.zeros(1, reader.d))
    image_gt = image_gt if image_gt is not None else image_truth(reader)
    words = words or world_words(image_gt.concepts)
    missing = [c for c in words if c not in image_gt.concepts]
    if missing:
        raise ValueError(f"concepts {missing} have no image labels; labelled: {list(image_gt.concepts)}")
    cols = [image_gt.concepts.index(c) for c in words]
    text_gt = word_truth(reader, tokenizer, words)
    concepts = crossmodal_concepts(_chunks(sae, reader, image_gt.rows), image_gt.coverage[:, cols] > 0,
                                   _chunks(sae, reader, text_gt.rows), text_gt.coverage > 0, tuple(words),
                                   tuple(words.values()), candidates)
    return CrossModalReport(concepts, f1_min, extra={"image_rows": int(len(image_gt.rows)),
                                                     "text_rows": int(len(text_gt.rows))})


def tokenizer_of(reader):
    """The tokenizer of the model a cache was made with (its token ids are that tokenizer's)."""
    from transformers import AutoTokenizer

    from interp.model.models import resolve_path

    path, _ = resolve_path(reader.meta["model"], reader.meta.get("revision") or None)
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- the command


@dataclass
class CrossModalConfig:
    """`interp crossmodal`: per concept of the shapes world, the best feature on its image patches, on the words
    naming it, and whether one feature does both (F1 >= f1_min)."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: reads RUN/sae/ and RUN/activations.h5 (image patches and text rows), writes RUN/crossmodal.json"""
    f1_min: float = 0.9
    """F1 on both modalities at which a concept counts as cross-modal"""
    json: bool = False
    """print the report as JSON"""


def run_crossmodal(cfg: CrossModalConfig) -> CrossModalReport:
    from interp.cache.reader import ActivationReader
    from saes.sae import SAE, sae_fingerprint

    layout = RunLayout.of(cfg.run)
    sae = SAE.load(layout.sae)
    with ActivationReader(layout.cache) as reader:
        report = crossmodal(sae, reader, tokenizer_of(reader), cfg.f1_min)
        report.extra.update(layer=reader.meta.get("layer"), model=reader.meta.get("model"))
    report.extra["sae_sha256"] = sae_fingerprint(layout.sae)
    write_crossmodal(report, layout.crossmodal)
    return report


def _report(report: CrossModalReport, cfg: CrossModalConfig) -> None:
    if cfg.json:
        print(json.dumps(report.to_json()))
        return
    print(f"{'concept':10s} {'image f':>7s} {'F1':>6s} {'text f':>7s} {'F1':>6s} {'shared':>7s} {'img F1':>6s} "
          f"{'txt F1':>6s}")
    for c in report.concepts:
        print(f"{c.concept:10s} {c.image.feature:7d} {c.image.f1:6.3f} {c.text.feature:7d} {c.text.f1:6.3f} "
              f"{c.shared_feature:7d} {c.shared_image.f1:6.3f} {c.shared_text.f1:6.3f}"
              + ("  cross-modal" if c.shared_f1 >= report.f1_min else ""))
    print(f"cross-modal: {len(report.cross_modal)}/{len(report.concepts)} concepts at F1 >= {cfg.f1_min} on both; "
          f"wrote {RunLayout.of(cfg.run).crossmodal}")


COMMANDS = [Command("crossmodal", CrossModalConfig, run_crossmodal,
                    "per concept, the best feature on its image patches and on the words naming it", report=_report)]
