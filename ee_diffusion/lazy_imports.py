"""Package namespaces that import a submodule when one of its names is first used.

`import ee_diffusion` (and so `ee-diffusion --help`) then costs nothing until a name that needs torch, diffusers or
transformers is touched. Each package states where its public names live:

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {".schedules": ["ExitSchedule"], ...})
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, list[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """The module-level `__getattr__`, `__dir__` and `__all__` of `package`.

    Args:
        package: The package's `__name__`.
        exports: Relative submodule (e.g. `".exits"`) -> the names of it the package exports.
    """
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in home:
            value = getattr(importlib.import_module(home[name], package), name)
        elif importlib.util.find_spec(f"{package}.{name}") is not None:  # a submodule, as after an eager import
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *home})

    return __getattr__, __dir__, sorted(home)
