"""Registries of the extension points (docs/design.md, "Extending"): adapter kinds, clustering
methods, baselines and boosting modes.

A registry maps the name a user writes in a config (``adapter.kind: lora``,
``clustering.method: sdp``, ``evaluation.baselines: [per-task]``, ``boosting.mode: exact``)
to one entry object that carries everything the rest of the code asks of that method. A new
method is one module that defines its entry and registers it; the config's allowed values
come from here, so an unknown name is an error that names the config key and lists what is
registered.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Registry", "RegistryError", "StrictModel", "field_error", "check_section",
           "section_of"]

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name, or an entry that does not say what the code needs of it."""


class StrictModel(BaseModel):
    """The base of every config section (and of the per-method sections an entry declares):
    unknown keys are errors, assignments are validated."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def field_error(field: str, value, message: str) -> ValidationError:
    """A validation error of one field of a section, raised from the section's validator: the
    config's error message then names the full key (``'adapter.kind': ...``)."""
    return ValidationError.from_exception_data("config", [{
        "type": "value_error", "loc": (field,), "input": value,
        "ctx": {"error": ValueError(message)}}])


class Registry(Generic[T]):
    """Names -> entries for one extension point. ``key`` is the config key that names an
    entry (used in error messages); ``check(entry)`` validates an entry when it is
    registered."""

    def __init__(self, what: str, key: str, check: Callable[[T], None] | None = None):
        self.what, self.key, self._check = what, key, check
        self._entries: dict[str, T] = {}

    def register(self, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``entry.name``; a name registered twice is an error unless
        ``replace``. Returns the entry (usable as a class decorator)."""
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.what} needs a non-empty string `name`, got {name!r}")
        if name in self._entries and not replace and self._entries[name] is not entry:
            raise RegistryError(f"{self.what} {name!r} is already registered "
                                f"({self._entries[name]!r}); pass replace=True to replace it")
        if self._check is not None:
            self._check(entry)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RegistryError(f"{self.key}: unknown {self.what} {name!r}; registered: "
                                f"{', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


def check_section(entry, base: type, field: str, what: str) -> None:
    """An entry's ``config`` must be a subclass of ``base`` whose ``field`` (``kind``,
    ``method``) defaults to the entry's name: the value that selects it in a config."""
    cfg = getattr(entry, "config", None)
    if not (isinstance(cfg, type) and issubclass(cfg, base)):
        raise RegistryError(f"{what} {entry.name!r}: `config` must be a subclass of "
                            f"{base.__name__}")
    spec = cfg.model_fields.get(field)
    if spec is None or spec.default != entry.name:
        raise RegistryError(f"{what} {entry.name!r}: its config's `{field}` field must default "
                            f"to {entry.name!r} (a Literal of the name)")


def section_of(registry: "Registry", data, field: str, default: str):
    """A config section validated by the config class of the entry its ``field`` names
    (``default`` when unset): an unknown name is an error naming the key and listing what is
    registered; a field that only another registered entry has is dropped with a warning (a
    config switched to another entry with ``--set`` keeps working); a field of no entry is an
    error. Returns (the entry, the validated section)."""
    import warnings

    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping, got {type(data).__name__}")
    name = data.get(field, default)
    if name not in registry:
        raise field_error(field, name, f"{name!r} is not a registered {registry.what}; "
                                       f"registered: {', '.join(registry.names())}")
    entry = registry.get(name)
    own = entry.config
    others = {f for e in registry for f in e.config.model_fields} - set(own.model_fields)
    dropped = sorted(k for k in data if k in others)
    if dropped:
        warnings.warn(f"{registry.key} {name!r} has no field(s) {', '.join(dropped)} (another "
                      f"{registry.what}'s); ignored", stacklevel=3)
    return entry, own.model_validate({k: v for k, v in data.items() if k not in others}
                                     | {field: name})
