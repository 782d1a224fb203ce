"""Every committed parity fixture says which reference commit and which script produced it."""
import re

import pytest

from fixture_io import FIXTURES, ROOT, load_fixture

pytestmark = pytest.mark.parity
FAMILIES = sorted(p.stem for p in FIXTURES.glob("*.pt"))


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_names_its_reference_commit_and_generator(family):
    meta = load_fixture(family)["meta"]
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"]), meta
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", meta["repo"]), meta
    assert (ROOT / meta["script"]).is_file(), f"{family}: generator {meta['script']} is not in the repository"
