"""A griffe extension for the API pages: the project's docstrings name other objects with Sphinx
roles (``:class:`DistilledSet```, ``:func:`~.recover.pixel_bounds```, ``:mod:`lightning_dd.io```),
which Markdown shows as raw text. Each role becomes a cross-reference to the object's own
rendered entry (mkdocs-autorefs) when the target is a public, documented object of
``lightning_dd``; anything else (torch, private helpers, a name that resolves to nothing) becomes
plain code. A cross-reference whose target is not on the site fails ``mkdocs build --strict``.
"""
from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|exc|obj|const):`([^`]+)`")


def _module_of(obj):
    while obj is not None and not obj.is_module:
        obj = obj.parent
    return obj


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package once it is loaded."""

    def on_package(self, *, pkg, loader, **kwargs) -> None:
        self.collection = loader.modules_collection
        self._walk(pkg)

    def _walk(self, obj) -> None:
        if obj.is_alias:
            return
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(lambda m: self._replace(obj, m), obj.docstring.value)
        for member in list(obj.members.values()):
            if not member.is_alias:
                self._walk(member)

    def _get(self, path: str):
        try:
            found = self.collection[path]
        except Exception:  # noqa: BLE001 - KeyError, or an alias that cannot be resolved
            return None
        try:
            return found.final_target if found.is_alias else found
        except Exception:  # noqa: BLE001
            return None

    def _resolve(self, obj, target: str):
        module = _module_of(obj)
        scope = obj if obj.is_class or obj.is_module else (obj.parent or module)
        candidates = []
        if target.startswith("."):
            base = module.path if module.is_init_module else module.path.rsplit(".", 1)[0]
            rel = target.lstrip(".")
            ups = len(target) - len(rel) - 1
            parts = base.split(".")
            candidates.append(".".join(parts[:len(parts) - ups] + [rel]))
        else:
            candidates.append(target)
            head, _, rest = target.partition(".")
            for where in (scope, module):
                try:
                    resolved = where.resolve(head)
                except Exception:  # noqa: BLE001 - griffe's NameResolutionError
                    continue
                candidates.append(resolved + ("." + rest if rest else ""))
            candidates += [f"{scope.path}.{target}", f"{module.path}.{target}"]
        for c in candidates:
            found = self._get(c)
            if found is not None:
                return found
        return None

    @staticmethod
    def _rendered(found) -> bool:
        """Whether mkdocstrings renders the object (public path, documented up to its module)."""
        if not found.path.startswith("lightning_dd") or any(p.startswith("_") for p in found.path.split(".")[1:]):
            return False
        o = found
        while o is not None and not o.is_module:
            if not o.docstring:
                return False
            o = o.parent
        return True

    def _replace(self, obj, m: re.Match) -> str:
        text = m.group(2).strip()
        short = text.startswith("~")
        target = text.lstrip("~")
        shown = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
        if m.group(1) in ("func", "meth"):
            shown += "()"
        found = self._resolve(obj, target)
        if found is not None and self._rendered(found):
            return f"[`{shown}`][{found.path}]"
        return f"`{shown}`"
