"""One registry for every string id a config can name: plugins, annotators, similarity backends, datasets,
loggers and architectures (the pattern of inseq's registries and pytest's entry-point plugins).

What it is for
    A config says ``annotator: offline`` or ``plugins: [saliency]``; the registry turns the id into the object.
    ``available()`` lists the ids and an unknown id fails with that list and how to add one. Third-party code
    is found through an entry-point group (``[options.entry_points] tuneshift.plugins = mine = pkg.mod:Class``),
    loaded on first lookup, the same way the built-ins are declared, so the core never imports its plugins.

Canonical pattern::

    ANNOTATORS = Registry("annotator", group="tuneshift.annotators")

    @ANNOTATORS.register("offline")
    class OfflineAnnotator(Annotator): ...

    ANNOTATORS.get("offline")          # the class; ANNOTATORS.get("typo") -> RegistryError listing the ids

Gotchas: an entry point that fails to import is reported when its id is asked for (with the import error),
not when another id is looked up, so one broken third-party package never stops an unrelated run.
"""
from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tuneshift.errors import TuneshiftError

T = TypeVar("T")


class RegistryError(TuneshiftError, ValueError):
    """An id is unknown (the message lists the known ones) or its entry point failed to load."""


class Registry(Generic[T]):
    """String id -> object, filled by :meth:`register` calls and by the entry points of ``group``."""

    def __init__(self, kind: str, group: str | None = None, how_to_add: str = ""):
        self.kind = kind
        self.group = group
        self.how_to_add = how_to_add
        self._items: dict[str, T] = {}
        self._broken: dict[str, str] = {}  # id -> why its entry point did not load
        self._scanned = group is None

    # ---- filling ------------------------------------------------------------------------------------------
    def register(self, name: str | Any = None, obj: T | None = None, *, replace: bool = True) -> Any:
        """``register("id", obj)``, or as a decorator ``@register("id")`` / ``@register`` (id from ``obj.name``)."""
        if name is not None and not isinstance(name, str):  # bare decorator: @REGISTRY.register
            return self._add(self._id_of(name), name, replace)
        if obj is not None:
            return self._add(name or self._id_of(obj), obj, replace)
        return lambda target: self._add(name or self._id_of(target), target, replace)

    def _id_of(self, obj: Any) -> str:
        ident = getattr(obj, "name", None) or getattr(obj, "id", None)
        if not isinstance(ident, str) or not ident:
            raise TypeError(f"{obj!r} has no `name`; register it as register('some_id', obj)")
        return ident

    def _add(self, name: str, obj: T, replace: bool) -> T:
        if not replace and name in self._items and self._items[name] is not obj:
            raise RegistryError(f"{self.kind} {name!r} is registered twice ({self._items[name]!r} and {obj!r})")
        self._items[name] = obj
        self._broken.pop(name, None)
        return obj

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def scan_entry_points(self) -> None:
        """Load every entry point of ``group`` once (built-in and third-party alike)."""
        if self._scanned:
            return
        self._scanned = True
        for point in entry_points(group=self.group):
            if point.name in self._items:
                continue
            try:
                self._items[point.name] = point.load()
            except Exception as err:  # noqa: BLE001 -- reported when this id is asked for
                self._broken[point.name] = f"entry point {point.value!r} failed to load: {type(err).__name__}: {err}"

    # ---- lookup -------------------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        self.scan_entry_points()
        if name in self._items:
            return self._items[name]
        if name in self._broken:
            raise RegistryError(f"{self.kind} {name!r}: {self._broken[name]}")
        known = ", ".join(self.available()) or "(none)"
        hint = f" {self.how_to_add}" if self.how_to_add else ""
        raise RegistryError(f"unknown {self.kind} {name!r}; available: {known}.{hint}")

    def available(self) -> list[str]:
        self.scan_entry_points()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self.scan_entry_points()
        return iter(sorted(self._items.items()))

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def copy(self) -> "Registry[T]":
        """A registry with the same entries (tests register into a copy so nothing leaks)."""
        clone: Registry[T] = Registry(self.kind, self.group, self.how_to_add)
        clone._items, clone._broken, clone._scanned = dict(self._items), dict(self._broken), self._scanned
        return clone

    def __contains__(self, name: object) -> bool:
        self.scan_entry_points()
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.available()})"


def validate_options(options_cls: type, raw: Any, what: str, error: type[Exception] | None = None) -> Any:
    """``raw`` (a mapping, or None for the defaults) checked against the dataclass ``options_cls``.

    A typo or a wrong type raises ``error`` (default :class:`~tuneshift.errors.ConfigError`) naming ``what``
    (e.g. ``plugin 'saliency'``), the key, and the valid keys.
    """
    from tuneshift.errors import ConfigError

    error = error or ConfigError
    if isinstance(raw, options_cls):
        return raw
    schema = OmegaConf.structured(options_cls)
    try:
        merged = OmegaConf.merge(schema, raw if raw is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        fields = ", ".join(f.name for f in dataclasses.fields(options_cls)) or "(none)"
        reason = str(err).splitlines()[0]
        raise error(f"bad options for {what}: {reason}. Valid options: {fields}") from err


def option_defaults(options_cls: type) -> dict[str, Any]:
    """The defaults of an options dataclass as plain data (for provenance and docs)."""
    return OmegaConf.to_container(OmegaConf.structured(options_cls), resolve=True)  # type: ignore[return-value]


Factory = Callable[..., Any]
__all__ = ["Registry", "RegistryError", "option_defaults", "validate_options"]
