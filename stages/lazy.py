"""Packages that import their submodules on first use (PEP 562).

    _EXPORTS = {"trainer": "TrainResult train_saes", "io": "load_sae save_sae"}
    __getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

`from stages.sae import train_saes` then imports `stages.sae.trainer` and nothing else
of the package, so a stage that uses one submodule runs (and, in dvc.yaml, depends on)
that submodule only. `_EXPORTS` must stay a dict literal: `tests/dvc_deps.py` reads it to
know which submodule each name comes from.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], eager: tuple[str, ...] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """(`__getattr__`, `__dir__`, `__all__`) for `package` exporting, per submodule, the
    space-separated names in `exports`; `eager` names the package defines itself."""
    where = {name: module for module, names in exports.items() for name in names.split()}
    names = sorted([*eager, *where])

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__, names
