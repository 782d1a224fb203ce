"""Each paper-size experiment is the paper's: the "Paper settings" tables of `experiments/*/README.md`
are composed and asserted row by row.

A table follows a heading ``## Paper settings: `experiment=NAME [more overrides]` `` and has the
columns ``| setting | paper / reference | source | ours |``: the setting is a dotted config key in
backticks, the paper and ours cells start with a value in backticks (YAML). Every row asserts that
the composed config holds the ``ours`` value, and that it is the paper's value unless the ``ours`` cell
carries ``†`` (a deviation, explained in a line starting with ``†`` under the table).
"""
import math
import re

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from conftest import ROOT

HEADING = re.compile(r"^#+ Paper settings: `([^`]+)`")
VALUE = re.compile(r"`([^`]*)`")


def _tables() -> list[tuple[str, str, list[str], list[list[str]], str]]:
    """(readme, heading, overrides, rows, section text) for every Paper settings table."""
    found = []
    for readme in sorted((ROOT / "experiments").glob("*/README.md")):
        lines = readme.read_text().splitlines()
        for i, line in enumerate(lines):
            m = HEADING.match(line)
            if not m:
                continue
            rows, section = [], []
            for nxt in lines[i + 1:]:
                if nxt.startswith("#"):
                    break
                section.append(nxt)
                cells = [c.strip() for c in nxt.strip().strip("|").split("|")]
                if nxt.startswith("|") and len(cells) >= 4 and cells[0].startswith("`"):
                    rows.append(cells)
            found.append((str(readme.relative_to(ROOT)), line, m.group(1).split(), rows, "\n".join(section)))
    return found


def _value(cell: str):
    m = VALUE.search(cell)
    assert m, f"no `value` in cell {cell!r}"
    v = yaml.safe_load(m.group(1))
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


TABLES = _tables()


@pytest.mark.parametrize("readme,heading,overrides,rows,section", TABLES, ids=[t[1].split("`")[1] for t in TABLES])
def test_paper_size_config_is_the_papers(readme, heading, overrides, rows, section):
    assert rows, f"{readme}: '{heading}' has no rows"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    for cells in rows:
        key = VALUE.search(cells[0]).group(1)
        composed = OmegaConf.select(cfg, key, default="<missing>")
        assert not (isinstance(composed, str) and composed == "<missing>"), f"{readme}: {key} is not a config key"
        if isinstance(composed, (DictConfig, ListConfig)):
            composed = OmegaConf.to_container(composed, resolve=True)
        ours, paper = _value(cells[3]), _value(cells[1])
        assert _same(composed, ours), f"{readme} {overrides}: {key} composes to {composed!r}, the table says {ours!r}"
        if "†" in cells[3]:
            assert re.search(r"^†", section, re.M), f"{readme}: {key} is marked † but no † note explains it"
        else:
            assert _same(ours, paper), f"{readme}: {key} is {ours!r}, the paper/reference says {paper!r} (mark † and explain)"


# the paper-size experiments that must have a table
REQUIRED = {"qat_deit_tiny_imagenet", "qat_swin_tiny_imagenet", "mast_pre_msr", "dm_cifar10", "dm_clom_cifar10",
            "dq_cifar10", "graphcut_cifar10", "datm_cifar10", "datm_cifar10_ipc1", "datm_cifar10_ipc50", "mtt_cifar10",
            "gcond_cora", "sgdd_cora", "sre2l_imagenet", "cda_imagenet", "sre2l_cifar10", "gvbsm_cifar10"}


def test_the_paper_size_experiments_have_tables():
    named = {o.split("=", 1)[1] for t in TABLES for o in t[2] if o.startswith("experiment=")}
    assert REQUIRED <= named, f"no Paper settings table for {sorted(REQUIRED - named)}"
