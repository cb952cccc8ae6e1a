"""Import paths (``"package.module:attribute"``): how a config names a model or data loader of the user's.

Code is imported only from what is installed on the machine that runs it (its ``sys.path``): a device
never fetches code because a server named it, so each error says what to install or where to put it.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Any

from amble.errors import ConfigError

IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
"""``module.path:attribute.path``: a dotted module, a colon, a dotted attribute inside it."""


def is_import_path(text: str) -> bool:
    """Whether ``text`` has the shape ``package.module:attribute`` (it may still fail to import)."""
    return bool(IMPORT_PATH.match(text))


def top_package(path: str) -> str:
    """The top-level package of an import path: ``mypkg`` for ``mypkg.nets:make_net``."""
    return path.split(":", 1)[0].split(".", 1)[0]


def import_module_of(path: str, what: str, shape: str = "function") -> tuple[ModuleType, str]:
    """The module ``path`` names, imported from this machine's installed code, and the attribute path after
    the colon. ``what`` says which config key named it (``model``, ``strategy``), for the error messages;
    ``shape`` what the attribute should be (``function``, ``Class``)."""
    if not is_import_path(path):
        raise ConfigError(
            f"{what} {path!r} is not an import path: write it as 'package.module:{shape}' (a colon before the "
            f"{shape.lower()}'s name)"
        )
    module_name, _, attribute = path.partition(":")
    try:
        return importlib.import_module(module_name), attribute
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"{what} {path!r}: module {module_name!r} is not importable on this machine (no module named "
                f"{exc.name!r}); install it here (pip install ...) or put its folder on PYTHONPATH. Code is never "
                "fetched from a server: every machine that runs the experiment must have it installed"
            ) from None
        raise ConfigError(
            f"{what} {path!r}: importing {module_name!r} failed: it needs {exc.name!r}, which is not installed "
            "here; install it"
        ) from None
    except Exception as exc:  # the user's module raised while being imported
        raise ConfigError(
            f"{what} {path!r}: importing module {module_name!r} raised {type(exc).__name__}: {exc}; fix that module"
        ) from None


def resolve_callable(path: str, what: str) -> Any:
    """The callable ``path`` names, imported from this machine's installed code.

    ``what`` says which config key named it (``model``, ``data.dataset``), for the error messages.
    """
    target: Any
    target, attribute = import_module_of(path, what)
    module_name = path.partition(":")[0]
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"{what} {path!r}: module {module_name!r} has no attribute {attribute!r}; check the name after the "
                "colon (it must be defined at the module's top level)"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(
            f"{what} {path!r} is a {type(target).__name__}, not a callable: name a function or class that builds it"
        )
    return target
