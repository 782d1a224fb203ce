import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LDD_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()


def load_script(relpath: str) -> ModuleType:
    """A script outside the package (``benchmarks/``, ``experiments/``) imported from its path
    relative to the repository root, as a module named after its file."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar10").is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (expected ../shared/data beside the checkout or LDD_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decode cache for the whole session (the real CIFAR-10 is decoded once)."""
    d = os.environ.get("LDD_CACHE_DIR")
    return Path(d) if d else tmp_path_factory.mktemp("ldd_cache")
