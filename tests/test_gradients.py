"""Stage 1 exactness: batched per-example gradients of the score differences h_c − h_0 vs the
plain autograd loop's per-choice gradients (their differences, taken here)."""
import pytest
import torch

from ensemble_core.config import parse_config
from ensemble_core.data import Example, load_task
from ensemble_core.checks import linearity_check
from ensemble_core.gradients import (batched_gradients, extract_features,
                                     reference_gradients)
from ensemble_core.models import (adapter_vector, load_model, set_adapter_vector,
                                   trainable_parameters)
from ensemble_core.scoring import ChoiceScorer
from ensemble_core.projection import GaussianProjector

from conftest import tiny_config


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _differences(G, examples):
    """The reference's per-choice gradient rows minus each example's first choice's row."""
    out, r = [], 0
    for ex in examples:
        n = len(ex.choices)
        out.append(G[r:r + n] - G[r])
        r += n
    return torch.cat(out)


def _check_rows(G, ref_D, examples):
    """Every first-choice row exactly zero; every other row close to the reference's."""
    r = 0
    for ex in examples:
        assert float(G[r].abs().max()) == 0.0, r
        for c in range(1, len(ex.choices)):
            assert _rel(G[r + c], ref_D[r + c]) <= 1e-3, (r, c)
        r += len(ex.choices)


@pytest.fixture(scope="module", params=["lora/none", "lora/nf4", "bottleneck/none",
                                        "bottleneck/nf4"])
def loaded(request, data_root, cache_dir, tmp_path_factory):
    """LoRA, QLoRA, the bottleneck adapter and QAdapter on the tiny model. A bottleneck's
    up-projection starts at zero, which makes its down-projection's gradient zero: its weights
    are moved off θ* (seeded) so that every gradient entry is exercised."""
    kind, quant = request.param.split("/")
    d = tiny_config(data_root, tmp_path_factory.mktemp("run"), cache_dir=str(cache_dir))
    if kind == "bottleneck":
        d["adapter"] = {"kind": "bottleneck", "reduction_factor": 8}
    cfg = parse_config(d)
    cfg.model.quantization = quant
    lm = load_model(cfg, cache_dir)
    if kind == "bottleneck":
        g = torch.Generator().manual_seed(0)
        theta = adapter_vector(lm.model)
        set_adapter_vector(lm.model, theta + 0.05 * torch.randn(theta.shape, generator=g))
    return cfg, lm


@pytest.mark.parametrize("task", ["rte", "cb", "copa"])
def test_batched_gradients_equal_autograd_loop(loaded, task, data_root):
    cfg, lm = loaded
    td = load_task(cfg.task(task), data_root)
    examples = td.splits["train"][:5]  # different lengths: padding inside the batch
    scorer = ChoiceScorer(lm.tokenizer, max_length=1024)
    mode = scorer.mode_for(examples)
    assert mode == ("sequence" if task == "copa" else "token")
    batch = scorer.encode(examples)
    assert (batch.attention_mask == 0).any(), "the batch must contain padding"
    out, G = batched_gradients(lm.model, batch)
    ref_out, ref_G = reference_gradients(lm.model, scorer, examples)
    ref_D = _differences(ref_G, examples)
    assert G.shape == ref_G.shape == (sum(len(e.choices) for e in examples), G.shape[1])
    assert _rel(out, ref_out) <= 1e-4
    assert float(ref_D.norm()) > 0
    assert _rel(G, ref_D) <= 1e-4
    _check_rows(G, ref_D, examples)  # per row too: no example's gradient leaks into another's


def test_projected_features_match_reference(loaded, data_root):
    cfg, lm = loaded
    td = load_task(cfg.task("cb"), data_root)
    examples = td.splits["validation"]
    scorer = ChoiceScorer(lm.tokenizer, max_length=1024)
    _, ref_G = reference_gradients(lm.model, scorer, examples)
    proj = GaussianProjector(ref_G.shape[1], 16, seed=3, block_rows=1000)
    table = extract_features(lm.model, scorer, examples, proj, task="cb", split="validation",
                             batch_size=4)
    P = torch.cat([proj.block(k) for k in range(proj.n_blocks)]) / 16 ** 0.5  # Z / √d
    expected = _differences(ref_G, examples) @ P
    assert _rel(torch.from_numpy(table.grad), expected) <= 1e-4
    assert _rel(torch.from_numpy(table.unit), expected * 16 ** 0.5) <= 1e-4
    # rows come back in example order although batches are sorted by length
    ids = [e.example_id for e in examples for _ in e.choices]
    assert list(table.example_id) == ids
    assert table.gold_index.tolist() == [e.label for e in examples]


def test_projected_features_with_the_default_lora_init(data_root, cache_dir, tmp_path):
    """PEFT's default init (B = 0): every A matrix's gradient is exactly zero at θ*, the
    projection skips those chunks, and the features still equal the reference's."""
    d = tiny_config(data_root, tmp_path, cache_dir=str(cache_dir))
    d["adapter"] = dict(d["adapter"], init="true")
    cfg = parse_config(d)
    lm = load_model(cfg, cache_dir)
    params = trainable_parameters(lm.model)
    is_a = torch.cat([torch.full((p.numel(),), "lora_A" in n) for n, p in params])
    scorer = ChoiceScorer(lm.tokenizer, max_length=1024)
    for task in ("cb", "copa"):  # token and sequence mode
        examples = load_task(cfg.task(task), data_root).splits["validation"]
        _, ref_G = reference_gradients(lm.model, scorer, examples)
        assert float(ref_G[:, is_a].abs().max()) == 0 and float(ref_G[:, ~is_a].norm()) > 0
        proj = GaussianProjector(ref_G.shape[1], 16, seed=3, block_rows=1000)
        table = extract_features(lm.model, scorer, examples, proj, task=task,
                                 split="validation", batch_size=4)
        P = torch.cat([proj.block(k) for k in range(proj.n_blocks)]) / 16 ** 0.5
        expected = _differences(ref_G, examples) @ P
        assert _rel(torch.from_numpy(table.grad), expected) <= 1e-4, task


def test_linearity_small_distances(loaded, data_root):
    cfg, lm = loaded
    td = load_task(cfg.task("rte"), data_root)
    scorer = ChoiceScorer(lm.tokenizer, max_length=1024)
    p = sum(q.numel() for q in lm.model.parameters() if q.requires_grad)
    rows = linearity_check(lm.model, scorer, td.splits["validation"][:4],
                           GaussianProjector(p, 32, seed=0), batch_size=4)
    assert [r["relative_distance"] for r in rows] == [0.0005, 0.001, 0.0015, 0.002, 0.0025]
    for r in rows:
        assert r["relative_error"] < 1e-2
        assert r["error_vs_change"] < 0.1


def test_long_prompts_are_truncated_from_the_left(loaded, data_root):
    cfg, lm = loaded
    td = load_task(cfg.task("cb"), data_root)
    examples = td.splits["train"][:3]
    scorer = ChoiceScorer(lm.tokenizer, max_length=64)
    batch = scorer.encode(examples)
    assert batch.truncated == 3 and batch.input_ids.shape[1] == 64
    # the end of the prompt ("Answer:") survives, the BOS too
    full = scorer._prompt_ids(examples[0].prompt)
    assert batch.input_ids[0, -5:].tolist() == full[-5:]
    if scorer.adds_bos:
        assert batch.input_ids[0, 0].item() == lm.tokenizer.bos_token_id
    out, G = batched_gradients(lm.model, batch)
    ref_out, ref_G = reference_gradients(lm.model, scorer, examples)
    assert _rel(G, _differences(ref_G, examples)) <= 1e-4


def _many_choice_examples():
    """Sequence mode with 2, 4 and 3 multi-token choices of different lengths in one batch."""
    return [
        Example("mc", "train", "a", "The sky at noon is usually", (" blue", " a deep green colour"), 0),
        Example("mc", "train", "b", "Pick the animal that barks:",
                (" the cat", " a dog", " one small bird", " fish"), 1),
        Example("mc", "train", "c", "Two plus two equals",
                (" four", " five or so", " twenty two"), 0),
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("pack", [True, False])
def test_packed_choices_equal_separate_sequences(loaded, attn, cut, pack):
    """All choices of an example share one packed sequence (block mask, positions restarting
    after the prompt); outputs and the gradients of the score differences equal the reference's
    on separate plain sequences, with varying choice counts, padding and (cut) left-truncated
    prompts; the same unpacked (one sequence per choice, one backward)."""
    cfg, lm = loaded
    examples = _many_choice_examples()
    scorer = ChoiceScorer(lm.tokenizer, max_length=1024)
    if cut:  # room for the longest choice and 3 prompt tokens
        scorer = ChoiceScorer(lm.tokenizer, max_length=3 + max(
            len(scorer.token_ids(c)) for e in examples for c in e.choices))
    lm.model.get_base_model().set_attn_implementation(attn)
    try:
        batch = scorer.encode(examples, pack=pack)
        assert batch.mode == "sequence"
        assert batch.input_ids.shape[0] == (len(examples) if pack else 9)
        assert (batch.attention_mask == 0).any()
        assert batch.truncated == (3 if cut else 0)
        out, G = batched_gradients(lm.model, batch)
        ref_out, ref_G = reference_gradients(lm.model, scorer, examples)
        # projected inside the backward loop == projecting the full gradients
        proj = GaussianProjector(G.shape[1], 16, seed=5, block_rows=777)
        _, Gp = batched_gradients(lm.model, batch, project=proj.project)
    finally:
        lm.model.get_base_model().set_attn_implementation("sdpa")
    assert out.shape == ref_out.shape == (9,)
    assert _rel(out, ref_out) <= 1e-4
    ref_D = _differences(ref_G, examples)
    _check_rows(G, ref_D, examples)
    assert _rel(G, ref_D) <= 1e-4
    assert torch.allclose(Gp, proj.project(G), rtol=1e-5, atol=1e-6)
