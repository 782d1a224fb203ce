"""MkDocs hook of the lightning_dd site: the pages that are generated at build time, never by hand.

* ``reference/config/<group>.md``: every config group under ``conf/`` and every option of it, with
  each key's type and constraints, the class default and the YAML value, read from the typed
  configs (the pydantic classes that ``_target_`` names, or a class's ``__init__`` signature) and
  from the YAML files themselves (their comments are the descriptions). ``reference/config/
  experiments.md`` lists the experiment presets and their CPU presets.
* ``reference/api/<package>.md``: one mkdocstrings page per subpackage (and one for the top-level
  modules), listing every public module it finds: a new module needs no edit here.
* ``results/<name>/index.md``: each ``experiments/<name>/README.md``, read when the site is built,
  with the pictures next to it published beside it (not copied into ``docs/``).
* ``<!-- results: NAME[#heading prefix] -->`` in a hand-written page is replaced by that section of
  ``experiments/NAME/README.md`` (or the whole file when no heading starts so), links fixed.

``tests/test_docs.py`` builds the site with this hook and imports it to check the config pages.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import posixpath
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("mkdocs.plugins.ldd_docs")

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp"}
# groups that are not a node of their own (presets that set keys across groups, Hydra's own)
NOT_NODE_GROUPS = {"experiment", "scale_preset", "hydra", "hparams_search"}
GROUP_TEXT = {
    "method": "The method: its class (``_target_``) and hyperparameters, which are the class's typed fields.",
    "data": "The DataModule: the reader of a data set's own on-disk layout under ``paths.data_dir``.",
    "net": "The network of the run (distillation / teacher / student), built by ``net.name`` or ``net._target_``.",
    "eval": "The evaluator of the run's result. Image methods read it as `ImageEvalConfig`; graph methods as "
            "`GraphEvalConfig` (the Cora experiments load ``conf/graph/cora_eval.yaml`` into ``eval``).",
    "trainer": "One Trainer factory for every stage of a run (experts, distillation, teachers, evaluation).",
    "logger": "W&B (offline unless configured online) and the CSV log; image grids and periodic evaluation.",
    "paths": "Where data is read, caches are kept and runs are written.",
    "augment": "Differentiable siamese augmentation (DSA) for experts, distillation and evaluation.",
    "clom": "CLoM guidance, mounted at ``method.clom`` by the methods that offer it (dm, datm, mtt).",
    "graph": "Graph evaluation presets (``# @package _global_``: they set ``eval.*`` for graph experiments).",
    "scale": "``scale=cpu`` | ``scale=paper``: picks ``conf/scale_preset/<experiment>/<scale>.yaml``.",
}


# ------------------------------------------------------------------------------------------------
# YAML: values with their `defaults` resolved (the simple forms used in conf/), and comments


def _load_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def load_option(conf: Path, group: str, option: str) -> dict:
    """``conf/<group>/<option>.yaml`` with its ``defaults`` list applied: ``- other`` (same group),
    ``- /group@key: option`` (mounted at ``key``), ``_self_`` ordering."""
    raw = _load_yaml(conf / group / f"{option}.yaml")
    defaults = raw.pop("defaults", None) or []
    out: dict = {}
    self_done = False
    for entry in defaults:
        if entry == "_self_":
            out, self_done = _merge(out, raw), True
            continue
        if isinstance(entry, str):
            out = _merge(out, load_option(conf, group, entry))
        elif isinstance(entry, dict):
            (key, opt), = entry.items()
            key = str(key).removeprefix("override ")
            grp, _, pkg = key.lstrip("/").partition("@")
            sub = load_option(conf, grp, str(opt)) if (conf / grp / f"{opt}.yaml").is_file() else {}
            out = _merge(out, {pkg: sub} if pkg else sub)
    return out if self_done else _merge(out, raw)


def yaml_comments(path: Path) -> dict[str, str]:
    """Dotted key -> the comment on its line, or the comment lines right above it."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            above = []
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            if stripped.startswith("# @package"):
                continue
            # a comment indented under the previous key continues that key's comment
            if stack and indent > stack[-1][0] and ":" not in stripped[1:3] and not above:
                key = ".".join(k for _, k in stack)
                if key in out:
                    out[key] += " " + stripped.lstrip("#").strip()
                    continue
            above.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"(\s*)([A-Za-z_][\w-]*)\s*:(.*)$", line)
        if not m:
            above = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        rest = m.group(3)
        inline = ""
        if "#" in rest:
            value_part, _, c = rest.partition(" #")
            inline = c.strip() if value_part is not rest else ""
            if rest.lstrip().startswith("#"):
                inline = rest.lstrip()[1:].strip()
        text = " ".join([*above, inline]).strip()
        if text and m.group(2) != "defaults":
            out[".".join(k for _, k in stack)] = text
        above = []
    return out


# ------------------------------------------------------------------------------------------------
# Types


def _constraints(meta) -> list[str]:
    out = []
    for m in meta:
        inner = getattr(m, "metadata", None)
        if inner and not isinstance(m, (int, float, str)):
            out += _constraints(inner)
        for attr, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            v = getattr(m, attr, None)
            if v is not None and not callable(v):
                out.append(f"{sym} {v}")
        if getattr(m, "allow_inf_nan", None) is False:
            out.append("finite")
    return out


def fmt_type(tp: Any, meta: list | None = None) -> str:
    """A readable type with its constraints: ``int > 0``, ``'auto' | 'hard'``, ``float > 0 | None``."""
    cons = _constraints(meta or [])
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        text = fmt_type(args[0], list(args[1:]))
    elif origin is typing.Literal:
        text = " | ".join(repr(a) for a in args)
    elif origin in (typing.Union, types.UnionType):
        text = " | ".join(fmt_type(a) for a in args)
    elif origin is not None:
        name = getattr(origin, "__name__", str(origin))
        text = f"{name}[{', '.join('...' if a is Ellipsis else fmt_type(a) for a in args)}]" if args else name
    elif tp is type(None) or tp is None:
        text = "None"
    elif tp is inspect.Parameter.empty:
        text = "any"
    elif isinstance(tp, type):
        text = tp.__name__
    else:
        text = str(tp).replace("typing.", "")
    return f"{text} ({', '.join(dict.fromkeys(cons))})" if cons else text


def _is_model(tp) -> bool:
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _nested_model(tp):
    """The pydantic model inside ``tp`` (``Model``, ``Model | None``), else ``None``."""
    if _is_model(tp):
        return tp
    for a in typing.get_args(tp):
        m = _nested_model(a)
        if m is not None:
            return m
    return None


def docstring_attributes(cls) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` sections of ``cls`` and its bases (Google style;
    ``a, b: text`` gives both names the text)."""
    out: dict[str, str] = {}
    for c in reversed(getattr(cls, "__mro__", [cls])):
        doc = inspect.getdoc(c) if c.__dict__.get("__doc__") else None
        if not doc:
            continue
        m = re.search(r"^(Attributes|Args):\n(.*?)(?:\n\S|\Z)", doc, re.S | re.M)
        if not m:
            continue
        current: list[str] = []
        for line in m.group(2).splitlines():
            entry = re.match(r"    ([\w, ]+):\s*(.*)$", line)
            if entry and not line.startswith("     "):
                current = [n.strip() for n in entry.group(1).split(",")]
                for n in current:
                    out[n] = entry.group(2).strip()
            elif line.strip() and current:
                for n in current:
                    out[n] += " " + line.strip()
    # "a: text. b, c: text" in one entry gives b and c their own text
    for name, text in list(out.items()):
        pieces = re.split(r"(?<=[.;])\s+(?=(?:[a-z_]\w*, )*[a-z_]\w*:\s)", text)
        out[name] = pieces[0]
        for piece in pieces[1:]:
            names, _, rest = piece.partition(": ")
            for n in names.split(", "):
                out.setdefault(n.strip(), rest.strip())
    return out


def option_comments(conf: Path, group: str, option: str, mount: str = "") -> dict[str, str]:
    """:func:`yaml_comments` of an option and of the files its ``defaults`` include (keys as mounted)."""
    path = conf / group / f"{option}.yaml"
    out: dict[str, str] = {}
    for entry in _load_yaml(path).get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            out.update(option_comments(conf, group, entry, mount))
        elif isinstance(entry, dict):
            (key, opt), = entry.items()
            grp, _, pkg = str(key).removeprefix("override ").lstrip("/").partition("@")
            if (conf / grp / f"{opt}.yaml").is_file():
                out.update(option_comments(conf, grp, str(opt), f"{mount}{pkg}." if pkg else mount))
    out.update({f"{mount}{k}": v for k, v in yaml_comments(path).items()})
    return out


def fields_of(cls) -> list[dict]:
    """``[{name, type, default, model}]`` of a pydantic model, or of a class's ``__init__``
    (following ``**kwargs`` up the bases)."""
    if _is_model(cls):
        rows = []
        for name, f in cls.model_fields.items():
            default = "required" if f.is_required() else (f.default_factory() if f.default_factory else f.default)
            rows.append({"name": name, "type": fmt_type(f.annotation, list(f.metadata)), "default": default,
                         "model": _nested_model(f.annotation), "doc": f.description or ""})
        return rows
    rows, seen = [], set()
    target = cls if inspect.isfunction(cls) else None
    chain = [target] if target else [c.__init__ for c in getattr(cls, "__mro__", []) if "__init__" in c.__dict__]
    for fn in chain:
        try:
            sig = inspect.signature(fn)
            hints = typing.get_type_hints(fn)
        except (TypeError, ValueError, NameError):
            continue
        has_kwargs = False
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                has_kwargs = True
                continue
            if p.name == "self" or p.kind is p.VAR_POSITIONAL or p.name in seen:
                continue
            seen.add(p.name)
            default = "required" if p.default is p.empty else p.default
            rows.append({"name": p.name, "type": fmt_type(hints.get(p.name, p.annotation)), "default": default,
                         "model": None, "doc": ""})
        if not has_kwargs:
            break
    return rows


def locate(path: str):
    """The object at a dotted path (as Hydra's ``_target_``), or ``None``."""
    parts = [p for p in path.split(".") if p]
    if not parts:
        return None
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


# ------------------------------------------------------------------------------------------------
# Config reference pages


def _cell(v: Any) -> str:
    if v is None:
        text = "null"
    elif isinstance(v, bool):
        text = str(v).lower()
    elif isinstance(v, str):
        text = v
    else:
        text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text else "`''`"


def _desc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict], values: dict, comments: dict, prefix: str, docs: dict) -> list[str]:
    out = ["| key | type | class default | value in this file | description |", "|---|---|---|---|---|"]
    nested = []
    names = {r["name"] for r in rows}
    for r in rows:
        key = f"{prefix}{r['name']}"
        in_yaml = r["name"] in values
        val = _cell(values[r["name"]]) if in_yaml else "—"
        if r["model"] is not None:
            nested.append(r)
            val = "see below" if in_yaml else "—"
        default = "*required*" if r["default"] == "required" else (
            "see below" if r["model"] is not None else _cell(r["default"]))
        desc = comments.get(key) or r["doc"] or docs.get(r["name"], "")
        out.append(f"| `{key}` | {_desc(r['type'])} | {default} | {val} | {_desc(desc)} |")
    for k, v in values.items():  # keys the class does not declare (kwargs passed on, _target_, name)
        if k not in names and k != "_target_":
            out.append(f"| `{prefix}{k}` | — | — | {_cell(v)} | {_desc(comments.get(prefix + k, ''))} |")
    for r in nested:
        model = r["model"]
        sub = values.get(r["name"]) if isinstance(values.get(r["name"]), dict) else {}
        out += ["", f"`{prefix}{r['name']}` ({model.__name__}):", ""]
        out += _table(fields_of(model), sub, comments, f"{prefix}{r['name']}.", docstring_attributes(model))
    return out


def _target_of(group: str, values: dict):
    if "_target_" in values:
        return locate(str(values["_target_"]))
    if group == "net" and values.get("name"):
        try:
            from lightning_dd.nets import net_target

            return locate(net_target(values))
        except Exception:  # noqa: BLE001 - an unknown name is listed without a class
            return None
    return None


def _eval_schemas() -> list:
    """The ``eval_schema`` classes of the methods that ``conf/method/*.yaml`` name."""
    out = []
    for f in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        cls = locate(str(_load_yaml(f).get("_target_", "")))
        schema = getattr(cls, "eval_schema", None)
        if schema is not None and schema not in out:
            out.append(schema)
    return out


def _option_section(conf: Path, group: str, option: str, cls_override=None) -> list[str]:
    path = conf / group / f"{option}.yaml"
    values = load_option(conf, group, option)
    raw = _load_yaml(path)
    global_pkg = "# @package _global_" in path.read_text()
    comments = option_comments(conf, group, option)
    head = [f"### `{group}={option}`", ""]
    lead = []  # the comment block at the top of the file
    for ln in path.read_text().splitlines():
        if not ln.startswith("#"):
            break
        if not ln.startswith("# @package"):
            lead.append(ln.lstrip("#").strip())
    if lead:
        head += [" ".join(lead), ""]
    head += [f"File: `conf/{group}/{option}.yaml`" + (" (`# @package _global_`)" if global_pkg else ""), ""]
    if raw.get("defaults"):
        head += ["Includes: " + ", ".join(f"`{d}`" if isinstance(d, str) else "`{}: {}`".format(*next(iter(d.items())))
                                          for d in raw["defaults"]), ""]
    cls = cls_override or _target_of(group, values)
    if global_pkg and group == "graph" and isinstance(values.get("eval"), dict):
        from lightning_dd.evaluate.graph import GraphEvalConfig

        values = values["eval"]
        comments = {k.removeprefix("eval."): v for k, v in comments.items()}
        cls = GraphEvalConfig
        head += ["Sets the `eval` node, read as `GraphEvalConfig`:", ""]
    if cls is None:
        rows = []
        if values:
            head += ["| key | value | description |", "|---|---|---|"]
            for k, v in values.items():
                head.append(f"| `{group}.{k}` | {_cell(v)} | {_desc(comments.get(k, ''))} |")
            head.append("")
        return head
    kind = "typed config (pydantic)" if _is_model(cls) else "constructor arguments"
    head += [f"Class: `{cls.__module__}.{cls.__qualname__}` — {kind}.", ""]
    rows = fields_of(cls)
    prefix = f"{group}." if group not in ("clom",) else "method.clom."
    comments = {f"{prefix}{k}": v for k, v in comments.items()}
    head += _table(rows, values, comments, prefix, docstring_attributes(cls))
    return [*head, ""]


def _run_keys_section(conf: Path) -> list[str]:
    from lightning_dd.core.config import RunConfig

    values = _load_yaml(conf / "train.yaml")
    values = {k: v for k, v in values.items() if k not in ("defaults", "hydra")}
    comments = yaml_comments(conf / "train.yaml")
    out = ["## Run keys (`conf/train.yaml`)", "",
           "The run's own top-level keys, validated as `lightning_dd.core.config.RunConfig` before any data "
           "is read. `scale_name` is set by `scale=cpu|paper`.", ""]
    out += _table(fields_of(RunConfig), values, comments, "", docstring_attributes(RunConfig))
    return [*out, ""]


def config_pages(conf: Path | None = None) -> dict[str, str]:
    """``{site path: markdown}`` of the config reference, generated from ``conf/`` and the classes."""
    conf = conf or ROOT / "conf"
    pages: dict[str, str] = {}
    groups = sorted(d.name for d in conf.iterdir() if d.is_dir() and d.name not in NOT_NODE_GROUPS)
    index = ["# Configuration reference", "",
             "Generated when the site is built, from the YAML files in `conf/` and the typed configs "
             "(pydantic classes) or constructors their `_target_` names: a field added to a class, or a key "
             "added to a YAML file, shows up here with no other edit. *class default* is what the class "
             "declares (*required* for method and evaluator fields: their YAML file is the one home of each "
             "default); *value in this file* is what the YAML option sets (the value a run gets unless an "
             "experiment, a scale preset or the command line overrides it).", "",
             "Override any key on the command line: `python train.py experiment=datm_cifar10 method.ipc=1 "
             "eval.num_eval=3`. A wrong type, an out-of-range value or an unknown key of a typed node stops "
             "the run before any data is read, naming the key.", "",
             "| group | options | what |", "|---|---|---|"]
    for g in groups:
        opts = sorted(p.stem for p in (conf / g).glob("*.yaml"))
        index.append(f"| [`{g}`]({g}.md) | {', '.join(f'`{o}`' for o in opts)} | {_desc(GROUP_TEXT.get(g, ''))} |")
        body = [f"# `{g}`", "", GROUP_TEXT.get(g, ""), "", f"Options: {', '.join(f'`{g}={o}`' for o in opts)}.", ""]
        if g == "eval":
            schemas = _eval_schemas()
            body += ["Typed as: " + ", ".join(f"`{s.__module__}.{s.__name__}`" for s in schemas)
                     + " (the method's `eval_schema`).", ""]
        for o in opts:
            override = None
            if g == "eval":
                from lightning_dd.evaluate.images import ImageEvalConfig

                override = ImageEvalConfig
            body += _option_section(conf, g, o, override)
        if g == "eval":
            from lightning_dd.evaluate.graph import GraphEvalConfig

            body += ["### Graph evaluator (`GraphEvalConfig`)", "",
                     "The `eval` node of graph methods; `conf/graph/cora_eval.yaml` sets it for the Cora experiments "
                     "(its values in the table).", ""]
            graph_eval = _load_yaml(conf / "graph" / "cora_eval.yaml").get("eval", {})
            body += _table(fields_of(GraphEvalConfig), graph_eval, {}, "eval.", docstring_attributes(GraphEvalConfig))
            body.append("")
        pages[f"reference/config/{g}.md"] = "\n".join(body)
    index += ["", *_run_keys_section(conf)]
    pages["reference/config/index.md"] = "\n".join(index)
    pages["reference/config/experiments.md"] = experiments_page(conf)
    return pages


def _experiment_picks(conf: Path, name: str) -> dict[str, str]:
    """The group choices of ``conf/experiment/<name>.yaml``, including the experiments it extends."""
    picks: dict[str, str] = {}
    for d in _load_yaml(conf / "experiment" / f"{name}.yaml").get("defaults") or []:
        if isinstance(d, str) and (conf / "experiment" / f"{d}.yaml").is_file():
            picks.update(_experiment_picks(conf, d))
        elif isinstance(d, dict):
            (k, v), = d.items()
            picks[str(k).removeprefix("override ").lstrip("/")] = str(v)
    return picks


def experiments_page(conf: Path) -> str:
    out = ["# Experiments", "",
           "`python train.py experiment=NAME [scale=cpu]`: the presets in `conf/experiment/` (generated from the "
           "files). Groups in *italics* are the primary config's defaults (`conf/train.yaml`). *CPU preset* is `conf/scale_preset/NAME/cpu.yaml`; without one `scale=cpu` is an error.", "",
           "| experiment | method | data | net | CPU preset | what |", "|---|---|---|---|---|---|"]
    base = {}
    for d in _load_yaml(conf / "train.yaml").get("defaults") or []:
        if isinstance(d, dict):
            (k, v), = d.items()
            base[str(k)] = str(v)
    for f in sorted((conf / "experiment").glob("*.yaml")):
        picks = _experiment_picks(conf, f.stem)
        for g in ("method", "data", "net"):  # not picked: the primary config's default (in italics)
            if g not in picks and base.get(g):
                picks[g] = f"*{base[g]}*"
        lines = []
        for ln in f.read_text().splitlines():
            if not ln.startswith("#"):
                break
            if not ln.startswith("# @package"):
                lines.append(ln.lstrip("#").strip())
        what = " ".join(lines)
        cpu = "yes" if (conf / "scale_preset" / f.stem / "cpu.yaml").is_file() else "no"
        out.append(f"| `{f.stem}` | {picks.get('method', '')} | {picks.get('data', '')} | {picks.get('net', '')} "
                   f"| {cpu} | {_desc(what)} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# API reference pages


def api_pages(package: str = "lightning_dd") -> dict[str, str]:
    """``{site path: markdown}``: one page per subpackage of ``package`` (``lightning_dd.data``,
    ``lightning_dd.methods.quantization.qat_vit``, ...: each of its public modules a ``::: module`` block) and one
    per top-level module (``lightning_dd.results``)."""
    pkg = importlib.import_module(package)
    groups: dict[str, list[str]] = {}
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts[1:]):
            continue
        if len(parts) >= 3 and _is_pkg(".".join(parts[:3])):
            key = ".".join(parts[:3])
        else:
            key = ".".join(parts[:2])
        groups.setdefault(key, []).append(info.name)
    pages = {}
    for key in sorted(groups):
        mods = sorted(set(groups[key]) | {key})
        body = [f"# `{key}`", ""]
        for m in mods:
            if m == key and len(mods) > 1 and not (importlib.import_module(m).__doc__ or "").strip():
                continue
            opts = ["    options:", "      show_submodules: false"] if m == key and len(mods) > 1 else []
            body += [f"::: {m}", *opts, ""]
        pages[f"reference/api/{key.removeprefix(package + '.').replace('.', '/')}.md"] = "\n".join(body)
    return pages


def _is_pkg(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return bool(spec and spec.submodule_search_locations)


# ------------------------------------------------------------------------------------------------
# Results records from experiments/


def experiment_dirs() -> list[Path]:
    return sorted(p for p in (ROOT / "experiments").iterdir() if (p / "README.md").is_file())


def _fix_links(md: str, src_dir: Path, page_dir: str) -> str:
    """Relative links of a README in ``src_dir``, for a page at site dir ``page_dir``: pictures and
    sibling READMEs point at their published copies, other repository files become plain text."""
    def repl(m: re.Match) -> str:
        bang, text, target = m.group(1), m.group(2), m.group(3).strip()
        if re.match(r"[a-z]+:|#|/", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        resolved = (src_dir / path).resolve()
        try:
            rel = resolved.relative_to(ROOT / "experiments")
        except ValueError:
            rel = None
        if rel is not None and resolved.suffix.lower() in IMAGE_SUFFIXES and resolved.is_file():
            new = posixpath.relpath(f"results/{rel.as_posix()}", page_dir)
            return f"{bang}[{text}]({new})"
        if rel is not None and resolved.name == "README.md" and resolved.is_file():
            new = posixpath.relpath(f"results/{rel.parent.as_posix()}/index.md", page_dir)
            return f"[{text}]({new}{'#' + anchor if anchor else ''})"
        shown = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else target
        return f"{text} (`{shown}`)" if not bang else f"`{shown}`"
    return re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", repl, md)


def _section(md: str, heading: str | None) -> str:
    if not heading:
        return md
    lines = md.splitlines()
    for i, ln in enumerate(lines):
        m = re.match(r"(#+)\s+(.*)", ln)
        if m and m.group(2).lower().startswith(heading.lower()):
            level = len(m.group(1))
            end = next((j for j in range(i + 1, len(lines))
                        if (h := re.match(r"(#+)\s", lines[j])) and len(h.group(1)) <= level
                        and not _in_fence(lines, j)), len(lines))
            return "\n".join(lines[i + 1:end])
    log.info("experiments README: no heading starting %r; the whole file is included", heading)
    return md


def _in_fence(lines: list[str], j: int) -> bool:
    return sum(1 for ln in lines[:j] if ln.startswith("```")) % 2 == 1


def _demote(md: str, levels: int) -> str:
    out, fence = [], False
    for ln in md.splitlines():
        if ln.startswith("```"):
            fence = not fence
        if not fence and re.match(r"#+\s", ln):
            ln = "#" * levels + ln
        out.append(ln)
    return "\n".join(out)


def results_page(name: str) -> str:
    src = ROOT / "experiments" / name
    md = (src / "README.md").read_text()
    note = (f"\n\n!!! note \"Source\"\n    This page is `experiments/{name}/README.md`, read when the site was "
            "built; the commands and numbers are the record of the runs.\n")
    m = re.match(r"(# .*\n)", md)
    md = md[:m.end()] + note + md[m.end():] if m else f"# {name}{note}\n{md}"
    return _fix_links(md, src, f"results/{name}")


def include_results(markdown: str, page_dir: str) -> str:
    def repl(m: re.Match) -> str:
        name, _, heading = m.group(1).partition("#")
        src = ROOT / "experiments" / name.strip()
        if not (src / "README.md").is_file():
            log.warning("%s: <!-- results: %s --> names no experiments/%s/README.md", page_dir, m.group(1), name)
            return ""
        body = _section((src / "README.md").read_text(), heading.strip() or None)
        return _fix_links(_demote(body, 1), src, page_dir)
    return re.sub(r"^<!--\s*results:\s*(.+?)\s*-->[ \t]*$", repl, markdown, flags=re.M)


# ------------------------------------------------------------------------------------------------
# MkDocs events


def _generated() -> dict[str, str]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    pages = {**config_pages(), **api_pages()}
    for d in experiment_dirs():
        pages[f"results/{d.name}/index.md"] = results_page(d.name)
    return pages


_PAGES: dict[str, str] = {}


def _titled(path: str) -> str:
    return path


def on_config(config):
    _PAGES.clear()
    _PAGES.update(_generated())
    cfg_pages = sorted(p for p in _PAGES if p.startswith("reference/config/") and p != "reference/config/index.md")
    api = sorted(p for p in _PAGES if p.startswith("reference/api/"))
    res = sorted(p for p in _PAGES if p.startswith("results/"))
    for entry in config.nav or []:
        if isinstance(entry, dict) and "Reference" in entry:
            entry["Reference"] += [{"Configuration": ["reference/config/index.md", *cfg_pages]}, {"API": api}]
        if isinstance(entry, dict) and "Results" in entry:
            entry["Results"] += [{p.split("/")[1]: p} for p in res]
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, text in _PAGES.items():
        files.append(File.generated(config, path, content=text))
    for d in experiment_dirs():
        for f in sorted(d.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(File.generated(config, f"results/{f.relative_to(ROOT / 'experiments').as_posix()}",
                                            abs_src_path=str(f)))
    return files


def records_table(page_dir: str) -> str:
    """A table of every ``experiments/<name>/README.md``: its results page and its title."""
    rows = ["| record | what |", "|---|---|"]
    for d in experiment_dirs():
        first = (d / "README.md").read_text().lstrip().splitlines()[0]
        title = first.lstrip("#").strip() if first.startswith("#") else d.name
        link = posixpath.relpath(f"results/{d.name}/index.md", page_dir)
        rows.append(f"| [{d.name}]({link}) | {_desc(title)} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    page_dir = posixpath.dirname(page.file.src_uri)
    if re.search(r"^<!--\s*records\s*-->\s*$", markdown, re.M):
        markdown = re.sub(r"^<!--\s*records\s*-->\s*$", lambda m: records_table(page_dir), markdown, flags=re.M)
    if "<!--" in markdown and "results:" in markdown:
        return include_results(markdown, page_dir)
    return markdown
