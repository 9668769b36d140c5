"""The bottleneck adapter and QAdapter (ensemble_core/bottleneck.py; issue 13): a PEFT method
created, saved and loaded like any other, exactly the base model at initialisation, and config
errors that name the key."""
import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from ensemble_core.adapters import load_adapter, save_adapter
from ensemble_core.bottleneck import BottleneckConfig, BottleneckLayer
from ensemble_core.config import ConfigError, parse_config
from ensemble_core.models import (ModelError, adapter_vector, attach_adapter, load_base,
                                  load_model, set_adapter_vector)

from conftest import tiny_config


def _cfg(data_root, tmp_path, cache_dir, quant="none", **adapter):
    d = tiny_config(data_root, tmp_path, cache_dir=str(cache_dir))
    d["adapter"] = {"kind": "bottleneck", "reduction_factor": 8, **adapter}
    d["model"] = dict(d["model"], quantization=quant)
    return parse_config(d)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapter_weights(model):  # loaded for inference, so not "trainable": by name
    return torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                      if ".bottleneck_" in n])


IDS = torch.tensor([[1, 17, 33, 5, 60, 2, 9, 41], [1, 4, 8, 15, 16, 23, 42, 0]])


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_initial_adapter_is_exactly_the_base_model(data_root, tmp_path, cache_dir, quant):
    cfg = _cfg(data_root, tmp_path, cache_dir, quant)
    base, _, _ = load_base(cfg.model, cache_dir)
    ref = _logits(base, IDS)
    model = attach_adapter(base, cfg.adapter, seed=cfg.seed)
    layers = [m for m in model.modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == 2 * cfg.model.tiny_layers  # after attention and after the MLP
    down = layers[0].bottleneck_down["default"]
    assert down.out_features == 64 // 8 and float(down.weight.abs().sum()) > 0
    assert torch.equal(_logits(model, IDS), ref)  # W_up = 0, b_up = 0: bit for bit


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_round_trip_through_peft_from_pretrained(data_root, tmp_path, cache_dir, quant):
    cfg = _cfg(data_root, tmp_path, cache_dir, quant)
    lm = load_model(cfg, cache_dir)
    theta = adapter_vector(lm.model)
    g = torch.Generator().manual_seed(1)
    set_adapter_vector(lm.model, theta + 0.1 * torch.randn(theta.shape, generator=g))
    trained = _logits(lm.model, IDS)
    out = save_adapter(lm.model, tmp_path / "adapter", base_fingerprint=lm.fingerprint["base"])
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["reduction_factor"] == 8
    assert saved["target_modules"] == ["down_proj", "o_proj"]

    base, _, _ = load_base(cfg.model, cache_dir)  # plain PEFT, as a user would load it
    again = PeftModel.from_pretrained(base, str(out))
    assert torch.equal(_logits(again, IDS), trained)
    assert torch.equal(_adapter_weights(again), _adapter_weights(lm.model))

    base2, _, fp = load_base(cfg.model, cache_dir)  # ours: checked against the base
    ours = load_adapter(base2, out, base_fingerprint=fp)
    assert torch.equal(_logits(ours, IDS), trained)
    with ours.disable_adapter():  # and the trained adapter does change the outputs
        assert not torch.allclose(_logits(ours, IDS), trained)


def test_get_peft_model_with_the_config_alone(cache_dir, data_root, tmp_path):
    """The registered method works through PEFT's own entry point, architecture defaults
    included (o_proj, down_proj for Llama)."""
    cfg = _cfg(data_root, tmp_path, cache_dir)
    base, _, _ = load_base(cfg.model, cache_dir)
    model = get_peft_model(base, BottleneckConfig(reduction_factor=4, task_type="CAUSAL_LM"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".bottleneck_" in n for n in names)
    assert {n.split(".bottleneck_")[0].rsplit(".", 1)[-1] for n in names} == {"o_proj",
                                                                               "down_proj"}


def test_config_errors_name_the_key(data_root, tmp_path, cache_dir):
    with pytest.raises(ModelError, match=r"adapter.reduction_factor = 128 is larger than .* 64"):
        load_model(_cfg(data_root, tmp_path, cache_dir, reduction_factor=128), cache_dir)
    with pytest.raises(ModelError, match=r"adapter.target_modules: .*'out_proj'.*o_proj"):
        load_model(_cfg(data_root, tmp_path, cache_dir, target_modules=["out_proj"]), cache_dir)
    d = tiny_config(data_root, tmp_path)
    d["adapter"] = {"kind": "bottleneck", "non_linearity": "softmax"}
    with pytest.raises(ConfigError, match="adapter.non_linearity"):
        parse_config(d)
    d["adapter"] = {"kind": "houlsby"}
    with pytest.raises(ConfigError, match="adapter.kind"):
        parse_config(d)
