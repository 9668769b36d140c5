"""LoRA (Hu et al., 2022): ``adapter.kind: lora``; QLoRA is LoRA on a 4-bit NF4 base
(``model.quantization: nf4``). The paper's main base method (Table 1; Figure 2)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import AdapterConfig, AdapterKind, WeightShape, register_adapter_kind


class LoraAdapterConfig(AdapterConfig):
    kind: Literal["lora"] = "lora"
    target_modules: list[str] = ["q_proj", "v_proj"]
    r: int = Field(8, ge=1, le=1 << 16)  # LoRA rank
    alpha: float = Field(16.0, gt=0.0)  # LoRA scale alpha / r
    # PEFT init_lora_weights: "true" (B = 0, the standard), "false" (B random), "gaussian", "pissa"…
    init: str = "true"


@register_adapter_kind
class LoRA(AdapterKind):
    name = "lora"
    label = "LoRA"
    config = LoraAdapterConfig
    # A reads the adapted module's input, B writes its output
    weights = (WeightShape(".lora_A.", "in", "input"), WeightShape(".lora_B.", "out", "output"))

    def peft_config(self, cfg: LoraAdapterConfig):
        from peft import LoraConfig

        init = {"true": True, "default": True, "false": False}.get(cfg.init, cfg.init)
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), init_lora_weights=init,
                          bias="none", task_type="CAUSAL_LM")

    def describe(self, cfg: LoraAdapterConfig) -> str:
        return f"r = {cfg.r}"
