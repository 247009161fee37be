"""Old module paths of the drivers, still importable: ``ensdiv.sweep`` is
:mod:`ensdiv.runs.sweep`, and so on (:data:`MOVED`). The modules moved when the drivers got
their own subpackage; the names inside them did not change.

Example:
    >>> import importlib
    >>> importlib.import_module("ensdiv.compare_run") is importlib.import_module(
    ...     "ensdiv.runs.compare")
    True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

MOVED: dict[str, str] = {
    "ensdiv.sweep": "ensdiv.runs.sweep",
    "ensdiv.compare_run": "ensdiv.runs.compare",
    "ensdiv.detection_run": "ensdiv.runs.detect",
    "ensdiv.certify_run": "ensdiv.runs.certify",
    "ensdiv.report": "ensdiv.runs.report",
    "ensdiv.plots": "ensdiv.runs.plots",
}
"""Old module path → where the module lives now."""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands back the module at the new one (the same object)."""

    def __init__(self) -> None:
        self._own: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._own[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system stamped the alias's spec on the module: give it back its own
        for own in self._own.values():
            if own is not None and own.name == module.__name__:
                module.__spec__ = own


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
