"""Import paths (``"package.module:attribute"``): how a config names a model or data loader of the user's.

Code is imported only from what is installed on the machine that runs it (its ``sys.path``): a device
never fetches code because a server named it, so each error says what to install or where to put it.

Every import path of a config is resolved here, in :func:`import_module_of`, and nowhere else. A
process that reads a config written by someone else (``amble device`` the server's, ``amble worker``
a run spec from Redis) resolves it under :func:`only_imports_from`: then a path whose top-level
package its operator did not allow (``--allow-import``) is refused before anything is imported,
whichever key of the config, present or future, names it. Built-in names are never imported.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ImportPolicy:
    """What a config written by someone else may make this process import: its operator's allow-list."""

    allowed: frozenset[str]
    """Top-level packages whose code the config may name (``--allow-import``)."""
    source: str
    """Whose config it is, for the messages: ``the server's config``, ``the run spec in Redis``."""
    reader: str
    """Who reads it: ``a device``, ``a worker``."""

    def check(self, path: str, what: str) -> None:
        """Refuse ``path`` (named by the config's key ``what``) unless its package is allowed."""
        package = top_package(path)
        if package not in self.allowed:
            raise ConfigError(
                f"{self.source} names {what} {path!r}: {self.reader} imports code only from packages its operator "
                f"allows. If you trust it and it is installed here, add --allow-import {package}"
            )


_POLICY: ContextVar[ImportPolicy | None] = ContextVar("amble_import_policy", default=None)
"""The policy in force; None: the operator's own config, which may import what is installed."""


@contextmanager
def only_imports_from(policy: ImportPolicy | None) -> Iterator[None]:
    """Resolve import paths under ``policy`` inside the block (None: no restriction)."""
    token = _POLICY.set(policy) if policy is not None else None
    try:
        yield
    finally:
        if token is not None:
            _POLICY.reset(token)


def packages_named(data: Any) -> list[str]:
    """The top-level packages of every import path in ``data`` (a config as plain data), sorted: what the
    workers a run starts itself must be allowed to import to rebuild it."""
    found: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, str) and is_import_path(value):
            found.add(top_package(value))
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, Iterable) and not isinstance(value, str | bytes):
            for item in value:
                visit(item)

    visit(data)
    return sorted(found)


def import_module_of(path: str, what: str, shape: str = "function") -> tuple[ModuleType, str]:
    """The module ``path`` names, imported from this machine's installed code, and the attribute path after
    the colon. ``what`` says which config key named it (``model``, ``strategy``), for the error messages;
    ``shape`` what the attribute should be (``function``, ``Class``)."""
    if not is_import_path(path):
        raise ConfigError(
            f"{what} {path!r} is not an import path: write it as 'package.module:{shape}' (a colon before the "
            f"{shape.lower()}'s name)"
        )
    policy = _POLICY.get()
    if policy is not None:
        policy.check(path, what)  # before anything is imported
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
