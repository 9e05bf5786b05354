import atexit
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the Arrow copies of the tests' data files and their tokens stay out of the user's cache (lorafit.train.sources)
# (tens of MB a run, removed when the run ends)
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lorafit-tests-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
# the CUDA tests check the Triton kernels from their first call; test_triton_warmup.py turns the helper on
os.environ.setdefault("LORAFIT_TRITON_WARMUP", "0")

# CI runs the same examples every time; locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
