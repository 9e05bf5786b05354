import atexit
import os
import re
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings

from tests import side_by_side as _side_by_side

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


@pytest.fixture(scope="session", autouse=True)
def _side_by_side_checks(request, tmp_path_factory):
    """The long checks the collected tests are marked with (tests/side_by_side.py), started with the session:
    one runs beside the suite, whose torch gets one core fewer meanwhile."""
    wanted = {m.args[0] for item in request.session.items for m in item.iter_markers("side_by_side")}
    if not wanted:
        yield None
        return
    checks = _side_by_side.Checks(wanted, lambda key: tmp_path_factory.mktemp(re.sub(r"\W+", "-", key)))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    checks.add_worker()
    try:
        yield checks
    finally:
        torch.set_num_threads(threads)
        checks.close()


@pytest.fixture
def side_by_side(_side_by_side_checks):
    """The results (futures) of the long checks; the marked tests run last, so a second worker joins now."""
    _side_by_side_checks.add_worker()
    return _side_by_side_checks.results


def pytest_collection_modifyitems(config, items):
    # the tests that wait for a long check come last: the suite runs beside the checks until then
    items.sort(key=lambda item: item.get_closest_marker("side_by_side") is not None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
