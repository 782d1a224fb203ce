"""Every command in the ```bash blocks of README.md and of every page of the documentation site
(``docs/**/*.md``) works as written.

Each command line is handled in one of these ways (``test_every_readme_command_is_handled`` fails on
a new command that is in none of them):

* ``python train.py ...``: composed with Hydra exactly as the line gives it (environment prefix
  included) and validated with :func:`lightning_dd.runner.check_config`, which builds the method,
  the ``eval`` node, the net, the Trainer factory and the scale preset before any data is read.
  Nothing is trained here: the bare ``python train.py`` runs end to end in
  ``tests/test_runs.py`` and a real multirun in ``tests/test_compare_and_sweeps.py`` (both slow);
  the CIFAR/ImageNet/Cora runs take minutes to hours. A multirun (``-m``) line is expanded into
  its jobs as Hydra's basic sweeper does (an Optuna search: each searched parameter at both ends of
  its range), each job is validated, and its sweep directory is resolved the way Hydra's launcher
  resolves it, before Hydra's runtime config exists (issue 13: a ``${hydra:...}`` there stopped every
  multirun before its first job).
* ``python evaluate.py ...``: composed the same way and validated as ``evaluate.py`` does before it
  reads a result (the ``eval`` node, the Trainer factory, the ``data`` node when given). Every
  example evaluates a CIFAR-10 result, which needs a CIFAR run first.
* ``python -m lightning_dd.compare ...``: run as written, in-process, from a directory holding an
  ``outputs/multirun/`` sweep laid out as ``train.py -m`` lays it out; ``--wandb`` with the W&B API
  replaced by those runs (it needs network access and an account).
* ``python -m lightning_dd.evaluate.graph ...``: every option of the line is one the CLI declares
  (the line needs a condensed graph from a Cora run).
* Placeholders are replaced by fixture values: ``<time>`` and ``...`` (a result) by a path,
  ``/path/to/`` by a temporary directory (the file created, empty), ``ENTITY`` by a test entity.
* Not run here, each for the reason in ``NOT_HERE``: installs, the test suite itself, ``wandb sync``
  and the benchmarks.
"""
from __future__ import annotations

import itertools
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, read_write

from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"


def command_sources() -> list:
    """README.md, then every Markdown page of the site, in a fixed order."""
    return [README, *sorted(DOCS.rglob("*.md"))]

NOT_HERE = {
    ("pip",): "installs packages (what a fresh clone does before anything else; CI's setup)",
    ("python", "-m", "pytest"): "the test suite itself",
    ("wandb",): "uploads to W&B (network and an account)",
    ("python", "benchmarks/"): "timing benchmarks (minutes of CPU; they report figures, not pass/fail)",
}


def readme_commands(paths=None) -> list[tuple[dict, list[str]]]:
    """``(environment assignments, argv)`` of every command in the bash blocks of ``paths`` (default:
    :func:`command_sources`; comments dropped, ``a && b`` split, a command given in several files
    listed once)."""
    out = []
    for path in paths or command_sources():
        for env, argv in _file_commands(path):
            if (env, argv) not in out:
                out.append((env, argv))
    return out


def _file_commands(path) -> list[tuple[dict, list[str]]]:
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            for is_and, part in itertools.groupby(tokens, lambda t: t == "&&"):
                if is_and:
                    continue
                part = list(part)
                env = {}
                while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
                    k, _, v = part.pop(0).partition("=")
                    env[k] = v
                out.append((env, part))
    return out


def kind(argv: list[str]) -> str:
    if argv[:2] == ["python", "train.py"]:
        return "train"
    if argv[:2] == ["python", "evaluate.py"]:
        return "evaluate"
    if argv[:3] == ["python", "-m", "lightning_dd.compare"]:
        return "compare"
    if argv[:3] == ["python", "-m", "lightning_dd.evaluate.graph"]:
        return "graph"
    return "not_here" if not_here_reason(argv) else "unhandled"


def not_here_reason(argv: list[str]) -> str | None:
    for prefix, reason in NOT_HERE.items():
        if len(argv) >= len(prefix) and all(a.startswith(p) if p.endswith("/") else a == p
                                            for a, p in zip(argv, prefix)):
            return reason
    return None


COMMANDS = readme_commands()


def _ids(cmds):
    return [" ".join([*(f"{k}={v}" for k, v in env.items()), *argv]) for env, argv in cmds]


def _of(k):
    cmds = [c for c in COMMANDS if kind(c[1]) == k]
    return pytest.mark.parametrize("env, argv", cmds, ids=_ids(cmds))


def test_every_readme_command_is_handled():
    assert len(COMMANDS) > 30, "README.md's bash blocks were not found"
    unhandled = [f"{path.relative_to(ROOT)}: {' '.join(argv)}" for path in command_sources()
                 for _, argv in _file_commands(path) if kind(argv) == "unhandled"]
    assert not unhandled, f"commands this test neither runs nor checks (add a handler): {unhandled}"
    kinds = {kind(argv) for _, argv in COMMANDS}
    assert {"train", "evaluate", "compare", "graph"} <= kinds
    assert any("-m" in argv for _, argv in COMMANDS if kind(argv) == "train"), "no multirun example left"


@_of("not_here")
def test_commands_not_run_here(env, argv):
    pytest.skip(f"not run by this test: {not_here_reason(argv)}")


def test_site_pages_are_read():
    """The site's pages are among the checked sources, and their commands are checked too."""
    pages = [p for p in command_sources() if p != README]
    assert pages, "no docs/**/*.md found"
    from_pages = [c for p in pages for c in _file_commands(p)]
    assert from_pages and all(c in COMMANDS for c in from_pages)


def test_readme_keeps_the_two_commands():
    argvs = [argv for _, argv in _file_commands(README)]
    assert ["pip", "install", "-e", ".[dev]"] in argvs and ["python", "train.py"] in argvs
    assert ["python", "-m", "pytest", "-q"] in argvs


def test_readme_says_how_to_install_cpu_wheels():
    cmds = [argv for _, argv in _file_commands(README) if argv[:2] == ["pip", "install"]]
    cpu = [a for a in cmds if "https://download.pytorch.org/whl/cpu" in a and "--index-url" in a]
    assert cpu and any(t.startswith("torch") for t in cpu[0]) and any(t.startswith("torchvision") for t in cpu[0])
    # the pins are the project's own, so that `pip install -e .` keeps the CPU wheels
    text = (ROOT / "pyproject.toml").read_text()
    for pin in (t for t in cpu[0] if t.startswith(("torch>", "torchvision>"))):
        assert f'"{pin}"' in text, f"{pin} is not the pin in pyproject.toml"


# ----------------------------------------------------------------------------------------------------
# Hydra composition


def _placeholders(args: list[str], tmp_path) -> list[str]:
    out = []
    for a in args:
        if "/path/to/" in a:
            k, _, v = a.partition("=")
            f = tmp_path / "placeholder" / v.split("/path/to/", 1)[1]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
            a = f"{k}={f}"
        a = a.replace("<time>", "2026-01-01_00-00-00")
        if a == "result=...":
            a = f"result={tmp_path / 'outputs' / 'run' / 'distilled.pt'}"
        out.append(a)
    return out


def _compose(config: str, overrides: list[str], tmp_path, set_hydra: bool = True):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=[*overrides, f"paths.cache_dir={tmp_path / 'cache'}"],
                      return_hydra_config=True)
    if set_hydra:
        HydraConfig.instance().set_config(cfg)
    return cfg


def _jobs(overrides: list[str]) -> list[list[str]]:
    """The job override lists of a multirun, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


def _search_space_ends(cfg) -> list[list[str]]:
    """For an Optuna search (``hydra.sweeper.params``): the overrides that put every searched
    parameter at the low, then at the high end of its range (choices: each value)."""
    params = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params else {}
    if not params:
        return [[]]
    parser = OverridesParser.create()
    ends: dict[str, list] = {}
    for key, spec in params.items():
        value = parser.parse_override(f"{key}={spec}").value()
        if hasattr(value, "start") and hasattr(value, "end"):
            ends[key] = [value.start, value.end]
        elif hasattr(value, "list"):
            ends[key] = list(value.list)
        else:
            ends[key] = [value]
    width = max(len(v) for v in ends.values())
    return [[f"{k}={v[min(i, len(v) - 1)]}" for k, v in ends.items()] for i in range(width)]


@pytest.fixture
def no_hydra_runtime():
    """Hydra's runtime config unset around the test (as when Hydra's launcher starts a sweep)."""
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().cfg = None
    yield
    HydraConfig.instance().cfg = saved


@_of("train")
def test_train_command_composes_and_validates(env, argv, tmp_path, monkeypatch, no_hydra_runtime):
    from lightning_dd.runner import check_config

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)  # relative paths (LDD_DATA_DIR=../shared/data) as from the checkout
    args = _placeholders(argv[2:], tmp_path)
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if multirun:
        # the launcher resolves the sweep dir with Hydra's runtime config unset
        # (the master config, which Hydra composes without the sweep overrides)
        plain = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
        master = _compose("train", plain, tmp_path, set_hydra=False)
        sweep_dir = OmegaConf.select(master, "hydra.sweep.dir")
        assert sweep_dir.startswith(f"{master.paths.log_dir}/multirun/"), sweep_dir
        jobs = [[*job, *ends] for job in _jobs(overrides) for ends in _search_space_ends(master)]
    else:
        jobs = [overrides]
    for num, job in enumerate(jobs):
        cfg = _compose("train", [*job, f"paths.output_dir={tmp_path / 'run'}"], tmp_path)
        try:
            check_config(cfg)
        except Exception as e:
            raise AssertionError(f"`{' '.join(argv)}` (job {job}) does not validate: {e}") from e
        if multirun:  # inside the job (runtime config set): <sweep dir>/<experiment>/<job number>
            with read_write(cfg.hydra):
                cfg.hydra.job.num = num  # as Hydra's launcher numbers its jobs
            HydraConfig.instance().set_config(cfg)
            experiment = cfg.hydra.runtime.choices.experiment
            assert OmegaConf.select(cfg, "hydra.sweep.subdir") == f"{experiment}/{num}"
            assert OmegaConf.select(cfg, "logger.wandb.group") == experiment  # W&B groups by experiment


@_of("evaluate")
def test_evaluate_command_composes_and_validates(env, argv, tmp_path, monkeypatch, no_hydra_runtime):
    from lightning_dd.core.config import instantiate_node, validated
    from lightning_dd.evaluate.images import ImageEvalConfig

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)
    cfg = _compose("evaluate", _placeholders(argv[2:], tmp_path), tmp_path)
    try:
        assert OmegaConf.select(cfg, "result"), "result= is missing"
        validated(ImageEvalConfig, cfg.eval, "eval")
        instantiate_node(cfg.trainer, "trainer")
        if cfg.get("data"):
            instantiate_node(cfg.data, "data")  # builds the DataModule; setup() would read the data
    except Exception as e:
        raise AssertionError(f"`{' '.join(argv)}` does not validate: {e}") from e


# ----------------------------------------------------------------------------------------------------
# python -m lightning_dd.compare, run as written


@pytest.fixture
def readme_sweep(tmp_path, monkeypatch):
    """A directory holding ``outputs/multirun/<time>/datm_digits/<n>``: two IPCs x two seeds."""
    from test_compare_and_sweeps import _fake_run

    accs = {(1, 0): 0.40, (1, 1): 0.42, (10, 0): 0.60, (10, 1): 0.63}
    for n, ((ipc, seed), acc) in enumerate(accs.items()):
        _fake_run(tmp_path / "outputs" / "multirun" / "2026-01-01_00-00-00" / "datm_digits" / str(n),
                  "datm", ipc, seed, acc)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@_of("compare")
def test_compare_command_runs_as_written(env, argv, readme_sweep, monkeypatch, capsys):
    import lightning_dd.compare as compare

    args = [a.replace("ENTITY", "test-entity") for a in argv[3:]]
    asked = []
    if "--wandb" in args:  # the W&B public API needs the network and an account: same runs, read locally
        def fake_wandb_runs(project):
            asked.append(project)
            return compare.find_runs([readme_sweep / "outputs" / "multirun"])
        monkeypatch.setattr(compare, "wandb_runs", fake_wandb_runs)
    assert compare.main(args) == 0
    out = capsys.readouterr().out
    assert "acc" in out or "eval/ConvNet" in out
    if "--wandb" in args:
        assert asked == [args[args.index("--wandb") + 1]]
    for flag in ("--csv", "--plot"):
        if flag in args:
            assert (readme_sweep / args[args.index(flag) + 1]).stat().st_size > 0


@_of("graph")
def test_graph_evaluate_command_uses_declared_options(env, argv, capsys):
    from lightning_dd.evaluate.graph import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    used = [a for a in argv[3:] if a.startswith("--")]
    assert used and all(re.search(rf"{re.escape(a)}\b", help_text) for a in used), (used, help_text)


# ----------------------------------------------------------------------------------------------------
# evaluate.py as the README uses it


def test_failed_evaluate_leaves_no_output_directory(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "evaluate.py", f"result={tmp_path / 'missing.pt'}",
                        f"paths.log_dir={tmp_path / 'outputs'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "missing.pt" in r.stderr + r.stdout
    assert list((tmp_path / "outputs" / "evaluate").iterdir()) == []  # no empty <time>/ left behind
    # a directory holding anything else is never removed
    keep = tmp_path / "keep"
    (keep / "notes").mkdir(parents=True)
    r = subprocess.run([sys.executable, "evaluate.py", f"result={tmp_path / 'missing.pt'}", f"hydra.run.dir={keep}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and (keep / "notes").is_dir() and (keep / ".hydra").is_dir()


def test_evaluate_compiles_only_where_it_pays():
    from lightning_dd.nets import worth_compiling

    assert not worth_compiling((1, 8, 8))  # digits: 25 s compiled against 5.9 s eager
    assert worth_compiling((3, 32, 32)) and worth_compiling((3, 64, 64))
