"""Named implementations of a protocol, registered as Python entry points.

One mechanism for checks, perturbations and attribution methods: a built-in registers in
`pyproject.toml` (`[project.entry-points."trustcase.checks"]` and friends) exactly as a partner's own
package does in its own metadata, so the module that defines a protocol never imports its
implementers. A plan may also name an unregistered class as 'module:Class'.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points

from trustcase.errors import UserError


class RegistryError(UserError, ValueError):
    """An unknown name, or a reference that is not an implementation of the protocol."""


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
            module, _, attr = name.partition(":")
            try:
                cls = getattr(importlib.import_module(module), attr)
            except ModuleNotFoundError as e:
                raise RegistryError(f"cannot import module {module!r} of {name!r}: {e}") from None
            except AttributeError:
                raise RegistryError(f"module {module!r} has no attribute {attr!r} (from {name!r})") from None
            except Exception as e:  # a partner's module runs code at import: what it raises is theirs
                raise RegistryError(f"importing module {module!r} of {name!r} raised {type(e).__name__}: {e}") \
                    from None
            return self._checked(cls, repr(name))
        raise RegistryError(f"unknown {self.what} {name!r}; known: {sorted(self)} or 'module:Class'")
