"""Adapter kinds: the paper's base methods (Figure 2, Table 2, Appendix B.3) behind one
registry (docs/design.md, "Extending").

An adapter kind is one module that defines an :class:`AdapterKind` subclass and registers it
with :func:`register_adapter_kind`. The entry carries everything the rest of the code asks of
the kind:

* ``config``: its config section, a subclass of :class:`AdapterConfig` whose ``kind`` field is
  the kind's name (``adapter.kind`` in a run config selects it; its other fields are the
  kind's own, e.g. LoRA's ``r`` and ``alpha``);
* ``peft_config(cfg)``: the PEFT config it builds (``get_peft_model`` creates the adapter, so
  it is saved and loaded as an ordinary PEFT adapter);
* ``check(base_model, cfg)``: config errors that need the model (beyond the target modules,
  which every kind checks), naming the key;
* ``weights``: which weights it owns, by name marker, and which side of the adapted module
  each must match (:class:`WeightShape`) — ``adapters.check_adapter_fits`` checks their
  shapes before PEFT touches a model, and ``adapters.load_weights`` refuses an adapter that
  lacks any of them; a kind cannot be registered without them;
* ``describe(cfg)``: how reports and errors name its size (``r = 8``).

Stage 1 differentiates every adapter weight with per-example hooks on ``nn.Linear`` modules
(``gradients``): a kind whose trainable weights are ``nn.Linear`` (LoRA's A and B, the
bottleneck's down and up projections) needs nothing more.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

from pydantic import Field

from ..registry import Registry, RegistryError, StrictModel, check_section, section_of

__all__ = ["AdapterConfig", "AdapterKind", "WeightShape", "ADAPTER_KINDS",
           "register_adapter_kind", "adapter_kind", "weight_shapes", "validate_adapter"]


class AdapterConfig(StrictModel):
    """The fields every adapter kind has; a kind's config subclasses it (``kind`` as a
    ``Literal`` of its name, plus its own fields)."""
    kind: str
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # the modules adapted: LoRA's wrapped Linears, or the modules a bottleneck adapter follows
    target_modules: list[str]


class WeightShape(NamedTuple):
    """A weight an adapter kind owns: every weight whose name contains ``marker`` belongs to
    the module named before the marker; its ``dim`` ("in": columns, "out": rows) must equal
    that module's ``side`` size ("input" or "output")."""
    marker: str
    dim: str
    side: str


class AdapterKind:
    """An adapter kind (see the package docstring). Subclass, set the class attributes and
    ``peft_config``, register an instance with :func:`register_adapter_kind`."""
    name: ClassVar[str]
    label: ClassVar[str]  # the paper's name of the method on a full-precision base
    config: ClassVar[type[AdapterConfig]]
    weights: ClassVar[tuple[WeightShape, ...]]

    def peft_config(self, cfg: AdapterConfig):
        raise NotImplementedError

    def check(self, base_model, cfg: AdapterConfig) -> None:
        """Errors naming the key for a config that cannot be built on ``base_model``."""

    def describe(self, cfg: AdapterConfig) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<adapter kind {self.name!r}>"


def _check_entry(kind: AdapterKind) -> None:
    check_section(kind, AdapterConfig, "kind", "adapter kind")
    shapes = getattr(kind, "weights", None)
    if not shapes or not all(isinstance(w, WeightShape) for w in shapes):
        raise RegistryError(f"adapter kind {kind.name!r}: `weights` must list the weights it "
                            "owns as WeightShape(marker, dim, side); without them saved "
                            "adapters could not be checked against a model")
    for w in shapes:
        if w.dim not in ("in", "out") or w.side not in ("input", "output"):
            raise RegistryError(f"adapter kind {kind.name!r}: {w} needs dim 'in'/'out' and "
                                "side 'input'/'output'")


ADAPTER_KINDS: Registry[AdapterKind] = Registry("adapter kind", "adapter.kind", _check_entry)


def register_adapter_kind(kind, *, replace: bool = False):
    """Register an adapter kind (an :class:`AdapterKind` instance or subclass; a subclass is
    instantiated). Usable as a class decorator."""
    entry = kind() if isinstance(kind, type) else kind
    ADAPTER_KINDS.register(entry, replace=replace)
    return kind


def adapter_kind(cfg_or_name) -> AdapterKind:
    """The registered kind of an adapter config (or of a kind name)."""
    return ADAPTER_KINDS.get(getattr(cfg_or_name, "kind", cfg_or_name))


def weight_shapes() -> tuple[WeightShape, ...]:
    """The weights of every registered kind (a saved adapter may be of any of them)."""
    return tuple(w for k in ADAPTER_KINDS for w in k.weights)


def validate_adapter(data) -> AdapterConfig:
    """An ``adapter`` config section validated by its kind's config class (``kind`` defaults
    to ``lora``; ``registry.section_of``)."""
    if isinstance(data, AdapterConfig):
        return data
    return section_of(ADAPTER_KINDS, data, "kind", "lora")[1]


from . import bottleneck, lora  # noqa: E402,F401  (the builtin kinds register themselves)
