"""Named implementations of a protocol, registered as Python entry points.

One mechanism for checks, perturbations and attribution methods: a built-in registers in
`pyproject.toml` (`[project.entry-points."trustcase.checks"]` and friends) exactly as a partner's own
package does in its own metadata, so the module that defines a protocol never imports its
implementers. A plan may also name an unregistered class as 'module:Class'.

`resolve` is the one way a use case's 'module:attr' reference (loader, model factory, black-box entry,
training entry, partner check, region function) becomes an object: `pkgutil.resolve_name` behind one error
mapping, so that a missing module, a missing attribute and a module whose own code raises while it is
imported are each one located user error of the caller's kind (`DataError` for a loader, `ModelError` for a
factory, ...). A module that is a file of the use case's folder is loaded from that file under a name of its
folder (`case_module`): two cases both have a `train.py`, and by its bare name one process (a test session, a
long-lived Dask worker, the explorer) would run, and hash, whichever was imported first.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
import sys
import traceback
import types
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from trustcase.errors import UserError


class RegistryError(UserError, ValueError):
    """An unknown name, or a reference that is not an implementation of the protocol."""


def resolve(ref: str, folder: Path | str | None = None, what: str = "reference",
            error: type[UserError] = RegistryError) -> Any:
    """The object 'module:attr' names, imported with `folder` (a use case's or partner's folder) first on
    sys.path. Every failure is an `error` that starts with `what` (where the reference sits, e.g.
    "data.loader") and names the reference, and says which of three went wrong: no such module, no such
    attribute, or the module's own code raised on import (with the file and line where it did)."""
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    module, colon, attr = ref.partition(":")
    if not (colon and module and attr):
        raise error(f"{what}: {ref!r} is not a 'module:attribute' reference")
    try:
        if (name := case_module(module, folder)) != module:
            found = importlib.import_module(name)
            for part in attr.split("."):
                found = getattr(found, part)
            return found
        return pkgutil.resolve_name(ref)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise error(f"{what}: cannot import module {module!r} of {ref!r}: {e}") from None
        raise error(f"{what}: importing module {module!r} of {ref!r} raised {_located(e)}") from None
    except Exception as e:  # a partner's module runs code at import: what it raises is theirs, said where
        if not _partners(e) and isinstance(e, AttributeError):  # the lookup itself
            raise error(f"{what}: module {module!r} has no attribute {attr!r} (from {ref!r})") from None
        if not _partners(e) and isinstance(e, ValueError):
            raise error(f"{what}: {ref!r} is not a 'module:attribute' reference") from None
        raise error(f"{what}: importing module {module!r} of {ref!r} raised {_located(e)}") from None


CASES = "trustcase_case_"  # the prefix of a use case folder's package: `trustcase_case_<folder name>[_<n>]`
_case_packages: dict[Path, str] = {}  # folder -> its package's name, in this process


def case_module(module: str, folder: Path | str | None) -> str:
    """The name `module` is imported under: a module (file or package) of the use case's `folder` is a submodule
    of a package whose path is that folder alone (`trustcase_case_solar_cells.train`), one per folder in this
    process; any other module (installed, trustcase's, elsewhere on sys.path) keeps its own name. Its bare
    imports of its siblings (`import cnn`) still go through sys.path."""
    if folder is None or not Path(folder).is_dir():
        return module
    folder = Path(folder).resolve()
    top = module.partition(".")[0]
    if not ((folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()):
        return module
    if folder not in _case_packages:
        stem = CASES + (re.sub(r"\W", "_", folder.name) or "root")
        taken = set(_case_packages.values())
        name = next(n for n in (stem, *(f"{stem}_{i}" for i in range(2, 10**6))) if n not in taken)
        package = types.ModuleType(name, f"the modules of the use case folder {folder}")
        package.__path__ = [str(folder)]  # its submodules are found in this folder only
        package.__spec__ = importlib.util.spec_from_loader(name, None, is_package=True)
        package.__spec__.submodule_search_locations = [str(folder)]
        sys.modules[name] = package
        _case_packages[folder] = name
    return f"{_case_packages[folder]}.{module}"


def bare_name(module: str) -> str:
    """A use case module's name as its folder knows it (`train` for `trustcase_case_solar_cells.train`)."""
    return module.partition(".")[2] if module.startswith(CASES) and "." in module else module


def _partners(e: BaseException) -> list[traceback.FrameSummary]:
    """The frames of the imported code (outside this module, Python's import machinery and pkgutil)."""
    return [f for f in traceback.extract_tb(e.__traceback__)
            if f.filename != __file__ and "importlib" not in f.filename and not f.filename.endswith("pkgutil.py")]


def _located(e: BaseException) -> str:
    """'Type: message (file:line)', at the last frame of the imported code."""
    frames = _partners(e)
    return f"{type(e).__name__}: {e}" + (f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else "")


class Registry(Mapping[str, type]):
    def __init__(self, group: str, base: type, what: str):
        self.group, self.base, self.what = group, base, what
        self._points: dict[str, object] | None = None
        self._loaded: dict[str, type] = {}

    def _entry_points(self) -> dict:
        if self._points is None:
            self._points = {ep.name: ep for ep in entry_points(group=self.group)}
        return self._points

    def __getitem__(self, name: str) -> type:
        if name not in self._loaded:
            ep = self._entry_points()[name]  # KeyError for an unknown name, as a Mapping should
            self._loaded[name] = self._checked(ep.load(), f"entry point {name!r} of {self.group}", name)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entry_points()))

    def __len__(self) -> int:
        return len(self._entry_points())

    def _checked(self, cls: object, where: str, name: str | None = None) -> type:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistryError(f"{where} is not a {self.base.__name__} subclass")
        if name is not None and getattr(cls, "name", name) != name:
            raise RegistryError(f"{where} names a class whose name is {cls.name!r}")
        return cls

    def resolve(self, name: str) -> type:
        """A registered name, or 'module:Class' (imported, then checked against the protocol)."""
        if name in self._entry_points():
            return self[name]
        if ":" in name:
            return self._checked(resolve(name, what=self.what), repr(name))
        raise RegistryError(f"unknown {self.what} {name!r}; known: {sorted(self)} or 'module:Class'")
