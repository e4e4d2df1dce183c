"""Fixtures every test module shares: the organisms, a small shapes run made by the stages' own
functions, a run with planted concept features, random SAEs, token grids, and a CLI runner.

Test modules never import each other: what two of them need lives here."""

import os

# No package index while tests run: transformer-lens may try to pip-install torchvision.
os.environ.setdefault("PIP_NO_INDEX", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest_plugins = ["tiny_models"]  # tiny random models of every family, shared by all test modules
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

from interp.shapes.world import concept_names  # noqa: E402

CONCEPTS = tuple(c for c in concept_names() if c != "object")  # what recovery scores: the world's patch concepts
PLANTED = ("color:red", "color:green", "color:blue", "shape:circle", "shape:square", "shape:letter k", "size:large",
           "background", "cell:top left")  # the planted run's features 0..8, in this order


@pytest.fixture(autouse=True)
def _keep_main_module():
    """streamlit's AppTest runs the app as `__main__` and leaves it there; a later multiprocessing
    "spawn" child (bench scale's stages) would then re-run the app instead of its target."""
    import sys

    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def subject():
    from interp.shapes.organisms import load_organism

    return load_organism("shapes-subject")


@pytest.fixture(scope="session")
def explainer():
    from interp.shapes.organisms import load_organism

    return load_organism("shapes-explainer")


# ---------------------------------------------------------------- a small shapes run


def make_shapes_run(run: Path, samples: int = 120, d_sae: int = 32, steps: int = 150, explain: bool = True) -> Path:
    """A run laid out as `interp demo` lays it out (cache of shapes-subject layer 4, a TopK SAE with its
    training metrics, eval, features, recovery, and with `explain` explanations and scores), made by the
    stages' own functions."""
    from explain.commands import ExplainConfig, ScoreConfig, run_explain, run_score
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.writer import CacheConfig, build_cache
    from saes.evaluate import EvalConfig, evaluate_sae
    from saes.recovery import RecoveryConfig, run_recovery
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, TrainRunConfig, run_train

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        build_cache(CacheConfig(run=str(run), samples=samples, batch_size=40))
        run_train(TrainRunConfig(run=str(run), sae=SAEConfig(d_sae=d_sae, k=4),
                                 train=TrainConfig(steps=steps, batch_size=1024, progress=False)))
        run_recovery(RecoveryConfig(run=str(run)))
        evaluate_sae(EvalConfig(run=str(run), samples=8, questions=4))
        compute_features(FeaturesConfig(run=str(run), progress=False))
        if explain:
            assert not run_explain(ExplainConfig(run=str(run), progress=False)).failed, quiet.getvalue()[-2000:]
            assert not run_score(ScoreConfig(run=str(run), progress=False))["failed"], quiet.getvalue()[-2000:]
    return run


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory) -> Path:
    """One small shapes run for the session; tests that change files work on `shapes_run_copy`."""
    return make_shapes_run(tmp_path_factory.mktemp("shapes-run") / "run")


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run directory for a test that writes into it (links stay links)."""
    shutil.copytree(run, dest, symlinks=True)
    return dest


@pytest.fixture
def shapes_run_copy(shapes_run, tmp_path) -> Path:
    return copy_run(shapes_run, tmp_path / "run")


@pytest.fixture(scope="session")
def small_demo_run(tmp_path_factory) -> Path:
    """`interp demo` with small settings: cache, SAE, features, recovery, explanations, steering at the SAE's
    own layer (for slow tests)."""
    from interp.infra.layout import RunLayout
    from interp.pipeline.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("small-demo") / "run"
    run_demo(DemoConfig(run=str(out), samples=400, steps=400, questions=20, recovery_seeds=2,
                        crossmodal=False, seed=0))
    layout = RunLayout(out)
    for need in (layout.cache, layout.features, layout.recovery, layout.summary):
        assert need.exists(), need
    return out


# ---------------------------------------------------------------- a run with planted concept features


def make_planted_run(run: Path, samples: int = 160) -> Path:
    """A shapes-subject cache and an SAE whose features 0..8 are least-squares probes of the concepts in
    PLANTED (ReLU at 0.5), 9 and 10 random directions, 11 dead; then its features.h5."""
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.reader import ActivationReader
    from interp.cache.writer import CacheConfig, build_cache
    from interp.infra.layout import RunLayout
    from interp.shapes.ground_truth import token_concepts
    from saes.sae import SAE, SAEConfig

    layout = RunLayout(run)
    build_cache(CacheConfig(run=str(run), samples=samples, batch_size=32, dtype="float32"))
    with ActivationReader(layout.cache) as r:
        gt = token_concepts(r, with_object=False)
        x = r.read(0, r.n_rows).numpy().astype(np.float64)[gt.rows]
        hook = r.meta["module_path"]
    assert gt.concepts == CONCEPTS
    labels = gt.labels()[:, [gt.concepts.index(c) for c in PLANTED]].astype(np.float64)
    mu = x.mean(0)
    w, *_ = np.linalg.lstsq(np.c_[x - mu, np.ones(len(x))], labels, rcond=None)
    sae = SAE(SAEConfig(arch="relu", d_in=x.shape[1], d_sae=12, normalize=False, model_name="shapes-subject",
                        hook_name=hook))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1e4)
        sae.W_enc[:, :9] = torch.tensor(w[:-1], dtype=torch.float32)
        sae.b_enc[:9] = torch.tensor(w[-1] - mu @ w[:-1] - 0.5, dtype=torch.float32)
        sae.W_enc[:, 9:11] = torch.randn(x.shape[1], 2, generator=g) / x.shape[1] ** 0.5
        sae.b_enc[9:11] = 0.0
        sae.W_dec.copy_(sae.W_enc.t())
    sae.save(layout.sae)
    compute_features(FeaturesConfig(run=str(run), top_samples=10, reservoir=24, negatives=12, progress=False))
    return run


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory) -> Path:
    return make_planted_run(tmp_path_factory.mktemp("planted") / "run")


@pytest.fixture
def planted_run_copy(planted_run, tmp_path) -> Path:
    return copy_run(planted_run, tmp_path / "planted")


# ---------------------------------------------------------------- small pieces


@pytest.fixture(scope="session")
def subject_path(tmp_path_factory):
    """A random-init shapes-subject v2 (8 LLM layers) saved like the shipped one (the Auto classes load it): for
    tests whose behaviour does not depend on trained weights."""
    from interp.shapes.organisms.build import SPECS, build_model, build_processor

    path = tmp_path_factory.mktemp("subject-v2") / "model"
    build_model(SPECS["subject"], seed=0).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


@pytest.fixture
def random_sae(tmp_path):
    """random_sae(d_in, d_sae, k=4, arch="topk", where=None) -> the directory of a saved random SAE."""
    from saes.sae import SAE, SAEConfig

    def make(d_in: int, d_sae: int, k: int = 4, arch: str = "topk", where: Path | None = None, **kw) -> Path:
        torch.manual_seed(0)
        sae = SAE(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k, **kw))
        return sae.save(where or tmp_path / f"sae-{arch}-{d_in}x{d_sae}")

    return make


def grid_token_table(n: int = 8, cell: float = 8) -> np.ndarray:
    from interp.cache.format import TOKEN_DTYPE

    t = np.zeros(n * n, TOKEN_DTYPE)
    t["row"], t["col"] = np.divmod(np.arange(n * n), n)
    t["x0"], t["y0"] = t["col"] * cell, t["row"] * cell
    t["x1"], t["y1"] = t["x0"] + cell, t["y0"] + cell
    return t


@pytest.fixture
def grid_tokens():
    """grid_tokens(n=8, cell=8): the token table of an n x n patch grid (row-major), as the organisms' on 64 px."""
    return grid_token_table


@pytest.fixture
def red_examples(grid_tokens):
    """red_examples(n=6): MarkedExamples of shapes scenes with the 'feature' on the patches of a red object, as a
    red feature's examples look."""
    from explain.examples import MarkedExample
    from interp.shapes.world import WorldConfig, sample_scene

    def make(n: int = 6) -> list:
        out, i = [], 0
        while len(out) < n:
            scene = sample_scene(WorldConfig(), i, "test", 0)
            red = [o for o in scene.objects if o.color == "red"]
            if red:
                frac = scene.object_patch_fractions()[scene.objects.index(red[0])]
                acts = np.where(frac.reshape(-1) > 0.05, 3.0, 0.0).astype(np.float32)
                out.append(MarkedExample(i, i, f"shapes:test:{i}:0", "top", scene.render(), grid_tokens(), acts, 3.0))
            i += 1
        return out

    return make


@dataclass
class CLIResult:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The error line (the last line of stderr that names an error)."""
        lines = [line for line in (self.err + self.out).splitlines() if "error" in line.lower()]
        return lines[-1] if lines else ""


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> CLIResult: `interp` in this process (the CLI's own tests; library work calls the stage
    functions). argparse's usage errors come back as exit code 2 like the CLI's own."""
    from interp.cli import main

    def run(*argv) -> CLIResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return CLIResult(code, captured.out, captured.err)

    return run
