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

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

__all__ = ["Registry", "RegistryError", "StrictModel", "NoCoercion", "field_error",
           "check_section", "section_of"]

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name, or an entry that does not say what the code needs of it."""


class NoCoercion(BaseModel):
    """Numbers as they are written: an integer field takes an integer only (not a boolean,
    ``"1"`` or ``1.0``: ``epochs: true`` or ``epochs: "1"`` is an error, not 1), a float field
    takes a number, not a boolean (nor text, except a number YAML reads as text: PyYAML reads
    ``2e-5`` as the string "2e-5")."""

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, v, info):
        field = cls.model_fields.get(info.field_name)
        if field is None:
            return v
        kinds, literals, items = _scalars(field.annotation)
        if isinstance(v, list) and items - {"str"}:
            return [_number(x, items, set()) for x in v]
        if isinstance(v, dict) and items - {"str"}:
            return {k: _number(x, items, set()) for k, x in v.items()}
        if not kinds - {"str"} or isinstance(v, (list, dict)):
            return v
        return _number(v, kinds, literals)


def _number(v, kinds: set, literals: set):
    """``v`` as a value of a field admitting ``kinds`` of numbers (module docstring rules)."""
    if v is None or (not isinstance(v, (list, dict)) and v in literals):
        return v
    if isinstance(v, str) and "str" in kinds:
        return v
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    if "float" in kinds:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                raise ValueError(f"expected a number, got {v!r}") from None
        return v
    if isinstance(v, (str, float)):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _scalars(annotation) -> tuple[set, set, set]:
    """The kinds ("int", "float", "str") an annotation admits at its top level (through
    Optional, Union and Annotated), the Literal values beside them, and the kinds of the items
    of a list or the values of a dict it admits."""
    import types
    import typing

    kinds, literals, items = set(), set(), set()
    todo = [(annotation, kinds)]
    while todo:
        a, into = todo.pop()
        origin = typing.get_origin(a)
        if a is bool:
            continue
        if a is str:
            into.add("str")
        elif a is int:
            into.add("int")
        elif a is float:
            into.add("float")
        elif origin is typing.Literal:
            literals.update(typing.get_args(a))
        elif origin is typing.Annotated:
            todo.append((typing.get_args(a)[0], into))
        elif origin is typing.Union or origin is types.UnionType:
            todo.extend((x, into) for x in typing.get_args(a))
        elif origin in (list, dict) and into is kinds:
            args = typing.get_args(a)
            if args:
                todo.append((args[-1], items))
    return kinds, literals, items


class StrictModel(NoCoercion):
    """The base of every config section (and of the per-method sections an entry declares):
    unknown keys are errors, assignments are validated, numbers are taken as written
    (:class:`NoCoercion`)."""
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
