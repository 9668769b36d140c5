"""Config validation: unknown keys and wrong types name the key; overrides; shipped configs."""
from pathlib import Path

import pytest

from ensemble_core.config import ConfigError, load_config, parse_config

from conftest import REPO, tiny_config


def test_shipped_configs_parse():
    tiny = load_config(str(REPO / "configs" / "tiny.yaml"))
    assert tiny.model.name == "tiny-llama" and len(tiny.tasks) >= 3
    assert Path(tiny.data_root).is_absolute()  # resolved relative to the config file
    for name in ("demo.yaml", "paper-protocol.yaml"):
        real = load_config(str(REPO / "configs" / name))
        assert real.model.name == "smollm2-135m" and len(real.tasks) >= 6
    assert real.training.epochs == 10 and real.adapter.r == 4  # the paper's protocol


def test_paper_protocol_is_the_demo_but_for_the_protocol():
    """configs/paper-protocol.yaml measures the compute ratio on the demo's data: it may differ
    from configs/demo.yaml only in its name, the LoRA rank (and alpha) and the epochs."""
    demo, paper = (load_config(str(REPO / "configs" / n)).model_dump(mode="json")
                   for n in ("demo.yaml", "paper-protocol.yaml"))
    for cfg in (demo, paper):
        for key in ("name", "output_dir", "run_dir"):
            cfg.pop(key, None)
        cfg["adapter"].pop("r"), cfg["adapter"].pop("alpha"), cfg["training"].pop("epochs")
    assert paper == demo


@pytest.mark.parametrize("patch, match", [
    ({"modle": {}}, "unknown key 'modle'"),
    ({"model": {"name": "tiny-llama", "quantisation": "nf4"}}, "unknown key 'model.quantisation'"),
    ({"model": {"quantization": "int3"}}, "'model.quantization'"),
    ({"training": {"epochs": "many"}}, "'training.epochs'"),
    ({"estimation": {"projection_dim": -4}}, "'estimation.projection_dim'"),
    ({"estimation": {"projection_cache_gb": -1}}, "'estimation.projection_cache_gb'"),
    ({"estimation": {"projection_dim": [200, 400], "fit_dim": 300}},
     r"estimation.fit_dim = 300 is not one of the computed projection dimensions"),
    ({"estimation": {"max_examples": {"test": 10}}}, "'estimation.max_examples'"),
    ({"boosting": {"mode": "gradient"}}, "'boosting.mode'"),
    ({"adapter": {"kind": "prefix"}}, "'adapter.kind'"),
    ({"adapter": {"kind": "bottleneck", "reduction_factor": 0}}, "'adapter.reduction_factor'"),
    ({"evaluation": {"baselines": ["per-task", "per-task"]}}, "lists a method twice"),
    ({"evaluation": {"baselines": ["bagging"]}}, "'evaluation.baselines.0'"),
    ({"training": {"schedule": "step"}}, "'training.schedule'"),
    ({"tasks": []}, "'tasks'"),
    ({"clustering": {"n_groups": 9}}, "n_groups = 9 is larger than the number of tasks"),
    # issue 36, item 7: numbers as written, bounds where a value can run away
    ({"training": {"epochs": True}}, r"'training.epochs': expected a number, got True"),
    ({"training": {"epochs": "1"}}, r"'training.epochs': expected an integer, got '1'"),
    ({"training": {"epochs": "1e9"}}, r"'training.epochs': expected an integer, got '1e9'"),
    ({"training": {"epochs": 10 ** 9}}, r"'training.epochs': Input should be less than or "
                                        r"equal to 10000"),
    ({"adapter": {"alpha": -1}}, r"'adapter.alpha': Input should be greater than 0"),
    ({"estimation": {"n_subsets": "1e8"}}, r"'estimation.n_subsets': expected an integer"),
    ({"estimation": {"n_subsets": 10 ** 8}}, r"'estimation.n_subsets': Input should be less"),
    ({"estimation": {"projection_dim": [8, True]}}, r"'estimation.projection_dim'"),
    ({"estimation": {"projection_dim": 10 ** 7}}, r"'estimation.projection_dim'.* larger than"),
    ({"seed": -1}, r"'seed': Input should be greater than or equal to 0"),
    ({"training": {"seed": 2 ** 40}}, r"'training.seed': Input should be less than"),
    ({"boosting": {"steps": 10 ** 6}}, r"'boosting.steps'"),
])
def test_config_errors_name_the_key(patch, match, tmp_path):
    cfg = tiny_config("/data", tmp_path)
    cfg.update(patch)
    with pytest.raises(ConfigError, match=match):
        parse_config(cfg)


def test_task_errors_name_the_task_key(tmp_path):
    cfg = tiny_config("/data", tmp_path)
    cfg["tasks"][1] = dict(cfg["tasks"][1], templat="{x}")
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\.1\.templat'"):
        parse_config(cfg)
    cfg = tiny_config("/data", tmp_path)
    cfg["tasks"].append(dict(cfg["tasks"][0]))
    with pytest.raises(ConfigError, match="duplicate task name 'rte'"):
        parse_config(cfg)


def test_overrides_and_fingerprint(tmp_path):
    cfg = parse_config(tiny_config("/data", tmp_path),
                       overrides=["training.epochs=3", "model.quantization=nf4",
                                  "tasks.0.max_examples={train: 4}"])
    assert cfg.training.epochs == 3 and cfg.model.quantization == "nf4"
    assert cfg.tasks[0].max_examples == {"train": 4}
    base = parse_config(tiny_config("/data", tmp_path))
    assert base.fingerprint("model") != cfg.fingerprint("model")
    assert base.fingerprint("adapter") == cfg.fingerprint("adapter")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_config(tiny_config("/data", tmp_path), overrides=["training.epochs"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(str(bad))


def test_yaml_duplicate_keys_and_alias_bombs_are_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("name: a\ntraining: {epochs: 2}\ntraining: {epochs: 3}\ntasks: []\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 3: key 'training' appears twice"):
        load_config(str(p))
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10**9 strings from a file of a few hundred bytes
        prev = chr(ord("a") + i - 1)
        bomb.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [" + ", ".join([f"*{prev}"] * 10)
                    + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(bomb) + "\n")
    assert p.stat().st_size < 1024
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_config(str(p))


@pytest.mark.parametrize("name", ["../../ESCAPED", "..", "rte/", "./rte", "a" * 300, "x\0y",
                                  "", "my task"])
def test_task_names_are_safe_path_components(name, tmp_path):
    cfg = tiny_config("/data", tmp_path)
    cfg["tasks"][0] = dict(cfg["tasks"][0], name=name)
    with pytest.raises(ConfigError, match="task name .* is not allowed|at least 1 character"):
        parse_config(cfg)


def test_task_names_unique_regardless_of_case(tmp_path):
    cfg = tiny_config("/data", tmp_path)
    cfg["tasks"][1] = dict(cfg["tasks"][1], name="RTE")
    with pytest.raises(ConfigError, match=r"duplicate task name 'RTE' \(the same as 'rte'"):
        parse_config(cfg)


def test_numbers_yaml_reads_as_text_still_count(tmp_path):
    """PyYAML reads `learning_rate: 2e-5` as the string "2e-5": a float field takes it (an
    integer field does not: an exponent is not an integer as written)."""
    import yaml

    cfg = tiny_config("/data", tmp_path)
    cfg["training"] = yaml.safe_load("learning_rate: 2e-5\nweight_decay: 1e-2")
    assert isinstance(cfg["training"]["learning_rate"], str)  # the quirk itself
    parsed = parse_config(cfg)
    assert parsed.training.learning_rate == 2e-5 and parsed.training.weight_decay == 0.01
