"""The bottleneck adapter (Houlsby et al., 2019) as a PEFT method: ``adapter.kind: bottleneck``,
and QAdapter when the base is 4-bit NF4 (the paper's Figure 2, Table 2 and Appendix B.3
evaluate both beside LoRA and QLoRA).

Each adapted module m (by default the attention output ``o_proj`` and the MLP output
``down_proj`` of every decoder layer: "after attention and after the MLP") computes

    y = m(x);   y ← y + W_up · φ(W_down · y + b_down) + b_up

with W_down: out → n, W_up: n → out, n = out // reduction_factor, φ a nonlinearity, before the
layer's residual connection adds y to its input. W_up and b_up start at zero, so a fresh
adapter θ* computes exactly the base model (as LoRA's B = 0 does) and every first-order
estimate is taken at the pretrained model. Both maps are ``nn.Linear``: stage 1's per-sample
gradient hooks (``gradients.PerSampleLinearGrads``) cover them unchanged.

PEFT knows a method by a member of its ``PeftType`` enum; this module adds ``BOTTLENECK`` to
it, then registers the config and tuner with ``peft.utils.register_peft_method``, so the
adapter is created with ``get_peft_model``, saved as ``adapter_config.json`` +
``adapter_model.safetensors`` and loaded with ``PeftModel.from_pretrained`` like any PEFT
adapter — in any process that has imported ``ensemble_core.bottleneck`` (``adapters.load_adapter``
and the ``bottleneck`` adapter kind, ``ensemble_core/adapter_kinds/bottleneck.py``, import it).
Adapters cannot be merged into the base weights (φ is nonlinear).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from torch import nn

from .adapter_kinds.bottleneck import DEFAULT_TARGETS as _TARGETS

__all__ = ["BottleneckConfig", "BottleneckModel", "BottleneckLayer", "PEFT_TYPE",
           "NONLINEARITIES", "DEFAULT_TARGETS", "bottleneck_size"]

NAME = "bottleneck"
NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
# PEFT's default targets by architecture (when target_modules is None): the adapter kind's
DEFAULT_TARGETS = {t: list(_TARGETS)
                   for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                             "phi3", "olmo", "olmo2", "granite", "smollm3")}


def _peft_type():
    """``PeftType.BOTTLENECK``, added to PEFT's enum on first use (PEFT has no public way to
    add a member; register_peft_method requires one)."""
    from peft.utils.peft_types import PeftType

    key = NAME.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, key, member)  # before the member map: EnumType guards members
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    return member


PEFT_TYPE = _peft_type()


def bottleneck_size(features: int, reduction_factor: int) -> int:
    """n = features // reduction_factor; a ValueError naming the key when that is 0."""
    n = features // reduction_factor
    if n < 1:
        raise ValueError(f"adapter.reduction_factor = {reduction_factor} is larger than the "
                         f"adapted modules' output size {features}: the bottleneck would have "
                         "no units")
    return n


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter (see the module docstring)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "modules whose output the adapter follows (default: "
                                        "o_proj and down_proj, after attention and the MLP)"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    reduction_factor: int = field(default=16, metadata={"help": "n = out_features // this"})
    non_linearity: str = field(default="relu", metadata={"help": "relu, gelu, silu or tanh"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on φ(W_down y)"})
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.non_linearity not in NONLINEARITIES:
            raise ValueError(f"bottleneck non_linearity {self.non_linearity!r} is not one of "
                             f"{sorted(NONLINEARITIES)}")
        if self.reduction_factor < 1:
            raise ValueError(f"bottleneck reduction_factor must be >= 1, got "
                             f"{self.reduction_factor}")


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A module followed by one bottleneck adapter per adapter name."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_act = nn.ModuleDict()
        self.bottleneck_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        if self.out_features is None:
            raise ValueError(f"a bottleneck adapter needs a linear-like module, got "
                             f"{type(self.get_base_layer()).__name__}")
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        n = bottleneck_size(self.out_features, config.reduction_factor)
        down = nn.Linear(self.out_features, n)
        up = nn.Linear(n, self.out_features)
        nn.init.zeros_(up.weight)  # θ* = the base model exactly
        nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_act[adapter_name] = NONLINEARITIES[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = (nn.Dropout(config.dropout) if config.dropout > 0
                                                 else nn.Identity())
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("a bottleneck adapter cannot be merged into the base weights (its "
                         "nonlinearity sits between the two projections)")

    def unmerge(self) -> None:
        pass

    def _delta(self, name: str, y: torch.Tensor) -> torch.Tensor:
        down, up = self.bottleneck_down[name], self.bottleneck_up[name]
        z = self.bottleneck_dropout[name](self.bottleneck_act[name](down(y.to(down.weight.dtype))))
        return up(z).to(y.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # ``adapter_names``: one adapter per row of x, as PEFT's mixed-adapter batches take it
        # (ensemble_core/members.py: every member of an ensemble in one pass)
        adapter_names = kwargs.pop("adapter_names", None)
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return y
        if adapter_names is not None:
            if len(adapter_names) != len(y):
                raise ValueError(f"{len(adapter_names)} adapter names for {len(y)} rows")
            out = y
            for name in dict.fromkeys(adapter_names):
                if name not in self.bottleneck_down:  # "__base__", or not adapted here
                    continue
                rows = torch.tensor([i for i, a in enumerate(adapter_names) if a == name],
                                    device=y.device)
                out = out.index_add(0, rows, self._delta(name, y.index_select(0, rows)))
            return out
        out = y
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            out = out + self._delta(name, y)
        return out

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """PEFT tuner that follows the target modules with bottleneck adapters."""

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = DEFAULT_TARGETS

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent,
                            current_key, parameter_name=None) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise ValueError("bottleneck adapters cannot be merged into the base model")


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel,
                             prefix=BottleneckModel.prefix)


_register()
