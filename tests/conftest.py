from pathlib import Path

import pyro
import pytest
from cli_helpers import TINY

from elbolab.cli import main

# ../shared/data beside the project: present on developers' machines and in CI, absent in a
# user's clone, where the tests that need it skip.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    """A run folder of ``elbolab fit`` with :data:`TINY`, one per test module (tests may write into it)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["fit", *TINY, "--out", str(out)]) == 0
    return out
