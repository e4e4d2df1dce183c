import os

# No package index while tests run: transformer-lens may try to pip-install torchvision.
os.environ.setdefault("PIP_NO_INDEX", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

pytest_plugins = ["tiny_models"]  # tiny random models of every family, shared by all test modules
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def subject():
    from interp.shapes.organisms import load_organism

    return load_organism("shapes-subject")


@pytest.fixture(scope="session")
def explainer():
    from interp.shapes.organisms import load_organism

    return load_organism("shapes-explainer")
