"""Bottleneck adapters (Houlsby et al., 2019): ``adapter.kind: bottleneck``; QAdapter on an NF4
base. The paper's Adapter and QAdapter base methods (Figure 2, Table 2, Appendix B.3). The
layers are a PEFT method of this package's own (``ensemble_core/bottleneck.py``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import AdapterConfig, AdapterKind, WeightShape, register_adapter_kind

# "after attention" and "after the MLP": the output projection of each (Llama-style names)
DEFAULT_TARGETS = ("o_proj", "down_proj")


class BottleneckAdapterConfig(AdapterConfig):
    kind: Literal["bottleneck"] = "bottleneck"
    # the modules the adapter follows
    target_modules: list[str] = list(DEFAULT_TARGETS)
    # out_features // reduction_factor units (the paper uses 256 on 7B models, hidden size
    # 4096: 16 units; SmolLM2's 576 at 16 gives 36), and the nonlinearity between
    reduction_factor: int = Field(16, ge=1, le=1 << 16)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"


@register_adapter_kind
class Bottleneck(AdapterKind):
    name = "bottleneck"
    label = "Adapter"
    config = BottleneckAdapterConfig
    # both projections read and write the adapted module's output
    weights = (WeightShape(".bottleneck_down.", "in", "output"),
               WeightShape(".bottleneck_up.", "out", "output"))

    def peft_config(self, cfg: BottleneckAdapterConfig):
        from ..bottleneck import BottleneckConfig

        return BottleneckConfig(target_modules=list(cfg.target_modules),
                                reduction_factor=cfg.reduction_factor,
                                non_linearity=cfg.non_linearity, dropout=cfg.dropout,
                                task_type="CAUSAL_LM")

    def check(self, base_model, cfg: BottleneckAdapterConfig) -> None:
        """A bottleneck needs at least one unit on every adapted module."""
        from ..bottleneck import bottleneck_size
        from ..models import ModelError

        for n, m in base_model.named_modules():
            if any(n == t or n.endswith("." + t) for t in cfg.target_modules):
                out = getattr(m, "out_features", None)
                if out is not None:
                    try:
                        bottleneck_size(out, cfg.reduction_factor)
                    except ValueError as e:
                        raise ModelError(f"{e} (module {n})") from None

    def describe(self, cfg: BottleneckAdapterConfig) -> str:
        return f"reduction factor {cfg.reduction_factor}"
