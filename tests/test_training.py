"""Group-adapter training (stage 4): loss goes down, seeds pin the weights, the best
epoch is restored, saved adapters are ordinary PEFT adapters."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from ensemble_core.config import parse_config
from ensemble_core.data import load_task
from ensemble_core.adapters import TRAINING_FILE, AdapterMismatchError, load_adapter, save_adapter
from ensemble_core.models import adapter_vector, load_base, load_model, set_adapter_vector
from ensemble_core.scoring import ChoiceScorer, choice_outputs, predict_scores
from ensemble_core.training import TrainingError, TrainResult, evaluate, train_adapter

from conftest import tiny_config

MAX_LEN = 128


@pytest.fixture(scope="module")
def setup(data_root, cache_dir, tmp_path_factory):
    # LoRA dropout on, so the determinism test covers the dropout masks too
    raw = tiny_config(data_root, tmp_path_factory.mktemp("run"), cache_dir=str(cache_dir))
    raw["adapter"]["dropout"] = 0.1
    cfg = parse_config(raw)
    lm = load_model(cfg, cache_dir)
    data = {t: load_task(cfg.task(t), data_root) for t in ("rte", "cb", "copa")}
    theta0 = adapter_vector(lm.model)
    return cfg, lm, data, theta0


def _tcfg(cfg, **kw):
    t = cfg.training.model_copy()
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def _split(data, tasks, split):
    return [ex for t in tasks for ex in data[t].splits[split]]


def _reset(lm, theta0):
    set_adapter_vector(lm.model, theta0)


def test_training_lowers_training_loss(setup):
    cfg, lm, data, theta0 = setup
    _reset(lm, theta0)
    train = _split(data, ("rte", "cb"), "train")
    val = _split(data, ("rte", "cb"), "validation")
    before = evaluate(lm.model, lm.tokenizer, train, MAX_LEN)
    # a constant rate: the test is about the loop, not the schedule (test_baselines has it)
    tcfg = _tcfg(cfg, learning_rate=3e-2, epochs=4, batch_size=4, schedule="constant",
                 warmup_ratio=0.0)
    res = train_adapter(lm.model, lm.tokenizer, train, val, tcfg, MAX_LEN)
    after = evaluate(lm.model, lm.tokenizer, train, MAX_LEN)
    assert after["average"]["loss"] < before["average"]["loss"] - 0.05, (before, after)
    assert not lm.model.training  # mode restored

    # the record
    assert res.n_steps == 4 * (8 // 4) * 2  # epochs x batches per task x tasks
    assert res.examples_seen == 4 * 16
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3, 4]
    assert res.history[0]["train_loss"] is None
    assert set(res.history[1]["val"]) == {"rte", "cb", "average"}
    assert res.best_epoch == 1 + int(np.argmin([h["val_loss"] for h in res.history[1:]]))
    n_lora = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    assert res.trainable_parameters == n_lora
    assert res.tokens_seen > 0 and res.n_params_forward > n_lora
    assert res.flops_estimate == 6.0 * res.n_params_forward * res.tokens_seen
    assert res.peak_memory_bytes > 0 and res.wall_seconds > 0
    back = TrainResult.from_json(json.loads(json.dumps(res.to_json())))
    assert back.to_json() == res.to_json()


def test_divergence_is_an_error_naming_the_setting(setup):
    """A learning rate that sends the weights to inf stops training with a message naming
    training.learning_rate, instead of saving a NaN adapter that later stages would average."""
    cfg, lm, data, theta0 = setup
    _reset(lm, theta0)
    train = _split(data, ("rte",), "train")
    tcfg = _tcfg(cfg, learning_rate=1e30, epochs=1, batch_size=4, schedule="constant",
                 warmup_ratio=0.0, max_grad_norm=None)
    with pytest.raises(TrainingError, match=r"training diverged.*training.learning_rate"):
        train_adapter(lm.model, lm.tokenizer, train, [], tcfg, MAX_LEN)
    _reset(lm, theta0)


def test_evaluate_and_scores(setup):
    cfg, lm, data, theta0 = setup
    _reset(lm, theta0)
    exs = _split(data, ("rte", "copa"), "validation")
    scores = predict_scores(lm.model, lm.tokenizer, exs, MAX_LEN, batch_size=4)
    assert [len(s) for s in scores] == [len(e.choices) for e in exs]
    # the same numbers as choice_outputs on one task's batch (copa: sequence mode)
    copa = data["copa"].splits["validation"]
    scorer = ChoiceScorer(lm.tokenizer, MAX_LEN)
    with torch.no_grad():
        ref = choice_outputs(lm.model, scorer.encode(copa, mode="sequence")).numpy()
    got = np.concatenate(scores[len(data["rte"].splits["validation"]):])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    res = evaluate(lm.model, lm.tokenizer, exs, MAX_LEN, batch_size=4)
    assert res["average"]["accuracy"] == pytest.approx(
        (res["rte"]["accuracy"] + res["copa"]["accuracy"]) / 2)
    assert res["average"]["n"] == len(exs)
    acc = np.mean([int(np.argmax(s)) == e.label for s, e in zip(scores, exs)
                   if e.task == "rte"])
    assert res["rte"]["accuracy"] == pytest.approx(acc)


def test_same_seed_gives_identical_weights(setup):
    cfg, lm, data, theta0 = setup
    train = _split(data, ("rte", "cb", "copa"), "train")
    tcfg = _tcfg(cfg, learning_rate=1e-2, epochs=2, batch_size=4, grad_accumulation=2,
                 max_steps=4, seed=7)
    thetas = []
    for seed in (7, 7, 8):
        _reset(lm, theta0)
        tcfg.seed = seed
        torch.manual_seed(seed + 100)  # the caller's RNG state must not matter
        res = train_adapter(lm.model, lm.tokenizer, train, [], tcfg, MAX_LEN)
        assert res.n_steps == 4 and res.best_epoch == 2  # 3 steps per epoch: stops in epoch 2
        thetas.append(adapter_vector(lm.model))
    assert not torch.equal(thetas[0], theta0)
    assert torch.equal(thetas[0], thetas[1])
    assert not torch.equal(thetas[0], thetas[2])


def test_best_epoch_is_restored(setup):
    cfg, lm, data, theta0 = setup
    _reset(lm, theta0)
    val = _split(data, ("rte", "cb"), "validation")
    # training on the validation examples with wrong labels makes validation worse every epoch
    flipped = [dataclasses.replace(e, label=(e.label + 1) % len(e.choices)) for e in val]
    snaps = {}

    def progress(epoch, epochs, detail):
        assert epochs == 3 and detail.startswith(f"epoch {epoch}: train loss ")
        snaps[epoch] = adapter_vector(lm.model)

    tcfg = _tcfg(cfg, learning_rate=3e-2, epochs=3, batch_size=6)
    res = train_adapter(lm.model, lm.tokenizer, flipped, val, tcfg, MAX_LEN, progress=progress)
    losses = {h["epoch"]: h["val_loss"] for h in res.history}
    assert losses[3] > losses[1] > losses[0]
    assert res.best_epoch == 1
    assert res.best_val_loss == losses[1]
    assert torch.equal(adapter_vector(lm.model), snaps[1])
    assert not torch.equal(snaps[1], snaps[3])
    again = evaluate(lm.model, lm.tokenizer, val, MAX_LEN)
    assert again["average"]["loss"] == pytest.approx(losses[1], rel=1e-5)


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    cfg, lm, data, theta0 = setup
    _reset(lm, theta0)
    train = _split(data, ("rte", "copa"), "train")
    res = train_adapter(lm.model, lm.tokenizer, train, [], _tcfg(cfg, max_steps=2), MAX_LEN)
    out = tmp_path_factory.mktemp("adapters") / "group-0"
    save_adapter(lm.model, out, res, base_fingerprint=lm.fingerprint["base"])
    return out, adapter_vector(lm.model), res


def test_save_and_peft_round_trip(setup, saved, cache_dir):
    from peft import PeftModel

    cfg, lm, data, theta0 = setup
    out, theta, res = saved
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "base_model.json",
        "training.json"]
    assert [p.name for p in out.parent.iterdir()] == ["group-0"]  # no temporaries left
    stored = TrainResult.from_json(json.loads((out / TRAINING_FILE).read_text()))
    assert stored.to_json() == res.to_json()

    set_adapter_vector(lm.model, theta)
    base, _, _ = load_base(cfg.model, cache_dir)
    reloaded = PeftModel.from_pretrained(base, str(out))
    scorer = ChoiceScorer(lm.tokenizer, MAX_LEN)
    for task in ("rte", "copa"):
        batch = scorer.encode(data[task].splits["validation"])
        with torch.no_grad():
            a = choice_outputs(lm.model, batch)
            b = choice_outputs(reloaded, batch)
        assert torch.equal(a, b), task
    loaded_theta = torch.cat([p.detach().reshape(-1) for n, p in reloaded.named_parameters()
                              if "lora_" in n])
    assert torch.equal(loaded_theta, theta)

    # saving again replaces the directory atomically
    save_adapter(lm.model, out, res, base_fingerprint=lm.fingerprint["base"])
    assert [p.name for p in out.parent.iterdir()] == ["group-0"]


def test_load_adapter_into_mismatched_base_is_a_clear_error(setup, saved, cache_dir):
    cfg, lm, data, theta0 = setup
    out, theta, res = saved
    other = cfg.model.model_copy(update={"tiny_hidden_size": 32})
    base, _, record = load_base(other, cache_dir)
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(base, out)
    msg = str(err.value)
    assert str(out) in msg and "q_proj" in msg and "64" in msg and "32" in msg
    assert not any("lora_" in n for n, _ in base.named_parameters())  # base left untouched
    # a stored fingerprint that differs is reported before any shape is looked at
    with pytest.raises(AdapterMismatchError, match="weights_sha256"):
        load_adapter(base, out, base_fingerprint=record)
    # an adapter for more layers than the base has: PEFT itself would load it silently
    shallow, _, _ = load_base(cfg.model.model_copy(update={"tiny_layers": 1}), cache_dir)
    with pytest.raises(AdapterMismatchError, match="has no module 'model.layers.1.self_attn"):
        load_adapter(shallow, out)
    # the matching base loads fine through the same function
    good, _, rec = load_base(cfg.model, cache_dir)
    model = load_adapter(good, out, base_fingerprint=rec)
    loaded_theta = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                              if "lora_" in n])
    assert torch.equal(loaded_theta, theta)


def test_qlora_trains_and_round_trips(data_root, cache_dir, tmp_path):
    cfg = parse_config(tiny_config(data_root, tmp_path, cache_dir=str(cache_dir)))
    cfg.model.quantization = "nf4"
    lm = load_model(cfg, cache_dir)
    theta0 = adapter_vector(lm.model)
    train = load_task(cfg.task("rte"), data_root).splits["train"]
    val = load_task(cfg.task("rte"), data_root).splits["validation"]
    res = train_adapter(lm.model, lm.tokenizer, train, [],
                        _tcfg(cfg, max_steps=2, learning_rate=1e-2), MAX_LEN)
    assert res.n_steps == 2 and not torch.equal(adapter_vector(lm.model), theta0)
    # 4-bit weights are counted by their logical size
    fp32 = sum(p.numel() for n, p in lm.model.named_parameters() if "embed_tokens" not in n)
    assert res.n_params_forward > fp32
    before = predict_scores(lm.model, lm.tokenizer, val, MAX_LEN)
    save_adapter(lm.model, tmp_path / "q", res, base_fingerprint=lm.fingerprint["base"])
    base, tok, rec = load_base(cfg.model, cache_dir)
    after = predict_scores(load_adapter(base, tmp_path / "q", base_fingerprint=rec), tok, val,
                           MAX_LEN)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_epoch_batches_are_one_task_each_and_bucketed_by_length():
    from ensemble_core.data import Example
    from ensemble_core.training import BUCKET_BATCHES, _epoch_batches

    rng = np.random.default_rng(0)
    exs = [Example(t, "train", str(i), "p", (" a", " b"), 0) for t in "xyz" for i in range(200)]
    lengths = rng.integers(5, 300, len(exs))
    one = _epoch_batches(np.random.default_rng(1), exs, 8, lengths.__getitem__)
    again = _epoch_batches(np.random.default_rng(1), exs, 8, lengths.__getitem__)
    assert one == again  # seeded
    assert sorted(i for _, b in one for i in b) == list(range(len(exs)))  # each once
    assert all(len({exs[i].task for i in b}) == 1 and exs[b[0]].task == t for t, b in one)
    plain = _epoch_batches(np.random.default_rng(1), exs, 8)
    pad = lambda batches: sum(len(b) * max(lengths[b]) - lengths[b].sum()  # noqa: E731
                              for _, b in batches)
    assert pad(one) < 0.2 * pad(plain)  # sorted within runs of BUCKET_BATCHES batches
    assert BUCKET_BATCHES >= 2
