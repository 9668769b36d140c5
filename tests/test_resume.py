"""Operations: a run killed with SIGKILL resumes from its run directory; two runs on one output
location do not corrupt each other; changing one dataset recomputes only what depends on it.

Every pipeline here runs as a separate process (``python -m flows.cli``), as an operator would
start it, against one real Prefect server started by this module, so the task-run states of each
run can be read back. Outputs are compared with those of an uninterrupted run in another
directory: the adapters and the other result files byte for byte, ``metrics.json`` on all of its
content except the wall-clock timings of its ``compute`` section (see ``comparable``).
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from conftest import REPO
from prefect_utils import task_states

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)

CONFIG = "configs/tiny.yaml"
TASKS = ["rte", "cb", "copa", "wic"]  # as in configs/tiny.yaml
TRAINED = ["group-0", "group-1", "all-tasks", "theta-star"]  # n_groups = 2 + baseline + θ*
RUN_TIMEOUT_S = 240
# extra arguments of a scenario's runs: the bottleneck adapter (issue 13) after attention and
# the MLP, 64 // 8 = 8 units on the tiny model
EXTRA = {"bottleneck": ["--set", "adapter.kind=bottleneck", "--set",
                        "adapter.target_modules=[o_proj, down_proj]", "--set",
                        "adapter.reduction_factor=8"]}
# compute fields that are wall-clock measurements (they differ between any two runs)
TIMING_FIELDS = {"gradients_s", "estimation_s", "group_adapters_s", "boosting_s",
                 "ensemble_pipeline_s", "baseline_s", "ratio", "peak_memory_bytes",
                 "scoring_s", "ratio_with_scoring"}


# ------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def server():
    """One real Prefect server for every run of this module; its API URL."""
    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def env(server, tmp_path_factory, cache_dir):
    e = dict(os.environ)
    e.update(PREFECT_API_URL=server, PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
             ENSEMBLE_LORA_CACHE=str(cache_dir), TOKENIZERS_PARALLELISM="false",
             PYTHONUNBUFFERED="1")
    e.pop("ENSEMBLE_LORA_DEBUG", None)
    return e


@pytest.fixture(scope="module")
def base_args(data_root, cache_dir):
    # one subset per task run, so that "subsets not containing the changed task" are task runs
    return ["--set", f"data_root={data_root}", "--set", f"cache_dir={cache_dir}",
            "--set", "estimation.subsets_per_task_run=1"]


class Run:
    """One `python -m flows.cli <command> configs/tiny.yaml` process writing to run_dir."""

    started: list["Run"] = []

    def __init__(self, env, base_args, run_dir: Path, log: Path, *extra, command="run"):
        self.run_dir, self.log_path = run_dir, log
        self.args = [command, CONFIG, *base_args, "--set", f"output_dir={run_dir}", *extra]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *self.args], cwd=REPO,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        Run.started.append(self)

    def wait(self, timeout=RUN_TIMEOUT_S) -> None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"run timed out after {timeout} s:\n{self.tail()}")
        finally:
            self.log.close()
        assert rc == 0, f"run failed (exit {rc}):\n{self.tail()}"

    def kill_when(self, condition, what: str, timeout=RUN_TIMEOUT_S) -> None:
        """SIGKILL the process as soon as ``condition()`` holds (polled every 10 ms)."""
        t0 = time.monotonic()
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n"
                            f"{self.tail()}")
            if time.monotonic() - t0 > timeout:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.01)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()  # reaped: the pid is gone, as after a real crash
        self.log.close()

    def tail(self, n=4000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


def records(run_dir: Path, stage: str) -> dict[str, dict]:
    """The complete cache records of a stage (key prefix) in a run directory: name -> result.
    A record counts once its metadata (written after its payload) parses."""
    out = {}
    for meta_path in glob.glob(str(run_dir / ".prefect" / "cache" / f"{stage}-*")):
        try:
            meta = json.loads(Path(meta_path).read_text())
            res = json.loads(Path(meta["storage_key"]).read_text())
        except (OSError, ValueError, KeyError):
            continue
        out[res.get("task") or res.get("name")] = res
    return out


def flow_run_id(run_dir: Path, flow_name: str):
    """The id of the newest completed flow run of ``flow_name`` that wrote to ``run_dir``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=200)
    mine = [r for r in runs if r.parent_task_run_id is None and r.state and r.state.is_completed()
            and wrote_to(r, run_dir)]
    assert mine, f"no completed {flow_name} flow run for {run_dir}"
    return max(mine, key=lambda r: r.start_time).id


def wrote_to(flow_run, run_dir: Path) -> bool:
    """Whether a flow run's parameters name ``run_dir`` (as an ``--set output_dir=`` override,
    or inside the config the CLI passed)."""
    return f"output_dir={run_dir}" in (flow_run.parameters.get("overrides") or []) \
        or f'"output_dir": "{run_dir}"' in json.dumps(flow_run.parameters, default=str)


def states_of(run_dir: Path, flow_name: str = "ensemble_lora") -> dict[str, str]:
    return task_states(flow_run_id(run_dir, flow_name))


def comparable(run_dir: Path) -> dict[str, object]:
    """What must be equal between two runs of one config: result files as bytes, except
    metrics.json, compared as content minus the wall-clock fields of ``compute`` (timings and
    peak memory are measurements of the machine, not results; they stay in metrics.json, where
    the report and the compute ratio read them, and are checked here for presence only), and
    adapter_config.json, compared as bytes too."""
    out: dict[str, object] = {}
    patterns = ["adapters/*/adapter_model.safetensors", "adapters/*/adapter_config.json",
                "gradients/*/*.parquet", "estimation/*.json", "scores/*/*.json", "affinity.json",
                "groups.json", "ensemble.json"]
    for pat in patterns:
        for f in sorted(glob.glob(str(run_dir / pat))):
            out[str(Path(f).relative_to(run_dir))] = Path(f).read_bytes()
    for name in [k for k in out if k.endswith("adapter_config.json")]:
        # the same bytes whatever model cache the base was loaded from (one test differs in
        # it): adapters.save_adapter names the base model, not PEFT's local path
        assert json.loads(out[name])["base_model_name_or_path"] == "tiny-llama", name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    compute = metrics.pop("compute")
    assert TIMING_FIELDS <= set(compute), sorted(compute)
    metrics["compute"] = {k: v for k, v in compute.items() if k not in TIMING_FIELDS}
    out["metrics.json"] = metrics
    return out


def assert_same_outputs(got: dict, reference: dict) -> None:
    """``got``: :func:`comparable` of a run directory."""
    assert sorted(got) == sorted(reference), "different sets of output files"
    differ = [k for k in reference if got[k] != reference[k]]
    assert not differ, f"outputs differ from the uninterrupted run: {differ}"
    n_adapters = len([k for k in got if k.endswith("adapter_model.safetensors")])
    assert n_adapters == 5  # group-0, group-1, all-tasks, theta-star, one boosting adapter


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(Path(p).relative_to(run_dir))
                  for p in glob.glob(str(run_dir / "**" / "*.tmp-*"), recursive=True)
                  + glob.glob(str(run_dir / "**" / ".*.tmp-*"), recursive=True))


def plant_leftovers(run_dir: Path, task: str) -> dict[Path, bytes]:
    """Temporaries as an interrupted write leaves them, with garbage content: a resumed run must
    never read them (it reads only final names, which appear by rename when complete)."""
    planted = {
        run_dir / "gradients" / task / "train.parquet.tmp-0123456789ab": b"PAR1 garbage",
        run_dir / "gradients" / task / "manifest.json.tmp-0123456789ab": b'{"task": "bogus"',
        run_dir / "metrics.json.tmp-0123456789ab": b'{"average": {"ensemble_accuracy": 1.0}}',
        run_dir / "adapters" / ".group-0.tmp-planted" / "adapter_model.safetensors": b"junk",
    }
    for path, data in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return planted


def assert_leftovers_ignored(planted: dict[Path, bytes]) -> None:
    for path, data in planted.items():  # untouched (or cleaned up), never renamed into place
        assert not path.exists() or path.read_bytes() == data, path


# ------------------------------------------------------------------------------------ the runs

def _code_version() -> str:
    from ensemble_core.runtime import code_version
    return code_version()


def _gradients_done(run_dir: Path) -> bool:
    """Stage 1 has finished some but not all of its tasks."""
    manifests = glob.glob(str(run_dir / "gradients" / "*" / "manifest.json"))
    return bool(records(run_dir, "gradients")) and len(manifests) < len(TASKS)


def _training_underway(run_dir: Path) -> bool:
    """Group training has finished some but not all of its adapters."""
    trained = len(records(run_dir, "train")) + len(records(run_dir, "theta-star"))
    return 0 < trained < len(TRAINED)


@pytest.fixture(scope="module")
def scenario(env, base_args, tmp_path_factory):
    """All the runs of this module, in two phases (the runs of a phase at the same time, to
    keep the module's wall time down):

    1. the uninterrupted reference run; a run SIGKILLed during stage 1; a run SIGKILLed
       during group training (leftover temporaries are then planted in both);
    2. both killed runs resumed; two runs started together on one fresh run directory; the
       reference's stages 1-2 again with one dataset changed (its outputs were read in 1).
    """
    root = tmp_path_factory.mktemp("operations")
    version = _code_version()
    dirs = {k: root / k / "run" for k in ("reference", "stage-1", "training", "shared",
                                          "bottleneck")}
    for d in dirs.values():
        d.parent.mkdir()
    out: dict = {"dirs": dirs, "version": version}
    try:
        yield _scenario(env, base_args, root, dirs, out)
    finally:
        for run in Run.started:  # after a failure: no process outlives the module
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def _scenario(env, base_args, root: Path, dirs: dict, out: dict) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    version = out["version"]
    # phase 1
    ref = Run(env, base_args, dirs["reference"], root / "reference" / "run.log")
    victims = {"stage-1": (_gradients_done, "stage 1 had finished some but not all tasks"),
               "training": (_training_underway, "group training was under way"),
               # issue 13: the pipeline with bottleneck adapters, killed and resumed
               "bottleneck": (_training_underway, "bottleneck training was under way")}
    runs = {k: Run(env, base_args, dirs[k], root / k / "killed.log", *EXTRA.get(k, ()))
            for k in victims}
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(runs[k].kill_when, lambda d=dirs[k], f=cond: f(d), what)
                   for k, (cond, what) in victims.items()]
        for f in futures:
            f.result()
    d = dirs["bottleneck"]
    out["bottleneck"] = {"done": set(records(d, "train")) | set(records(d, "theta-star")),
                         "records": {**records(d, "train"), **records(d, "theta-star")}}
    d = dirs["stage-1"]
    out["stage-1"] = {
        "done": set(records(d, "gradients")),
        "manifests": {Path(p).parent.name
                      for p in glob.glob(str(d / "gradients" / "*" / "manifest.json"))},
        "locks": glob.glob(str(d / ".prefect" / "locks" / "gradients-*.lock")),
    }
    out["stage-1"]["planted"] = plant_leftovers(
        d, sorted(set(TASKS) - out["stage-1"]["done"])[0])
    d = dirs["training"]
    out["training"] = {"done": set(records(d, "train")) | set(records(d, "theta-star")),
                       "metrics": (d / "metrics.json").exists(),
                       "planted": plant_leftovers(d, "cb")}
    ref.wait()
    out["reference"] = comparable(dirs["reference"])
    out["reference-states"] = states_of(dirs["reference"])

    # phase 2
    resumed = [Run(env, base_args, dirs[k], root / k / "resumed.log", *EXTRA.get(k, ()))
               for k in victims]
    fresh_cache = ["--set", f"cache_dir={root / 'shared' / 'model-cache'}"]
    shared = [Run(env, base_args, dirs["shared"], root / "shared" / f"run-{i}.log", *fresh_cache)
              for i in range(2)]
    changed = Run(env, base_args, dirs["reference"], root / "reference" / "changed.log",
                  "--set", "tasks.1.max_examples.train=12", command="affinity")
    for r in resumed + shared + [changed]:
        r.wait()
    for k in victims:
        out[k]["states"] = states_of(dirs[k])
        out[k]["outputs"] = comparable(dirs[k])
    out["bottleneck"]["after"] = {**records(dirs["bottleneck"], "train"),
                                  **records(dirs["bottleneck"], "theta-star")}
    out["shared-outputs"] = comparable(dirs["shared"])
    out["shared-leftovers"] = leftovers(dirs["shared"])
    out["changed-states"] = states_of(dirs["reference"], "affinity")
    out["changed-subsets"] = [json.loads(Path(f).read_text()) for f in
                              sorted(glob.glob(str(dirs["reference"] / "estimation" /
                                                   "subsets-*.json")))]

    # phase 3 (issue 17): on the reference directory, config B (another epoch count), then
    # the reference's config A again; on the resumed training directory, outputs deleted or
    # changed behind the cache's back, resumed under another PREFECT_HOME
    other = ["--set", "training.epochs=2"]
    config_b = Run(env, base_args, dirs["reference"], root / "reference" / "config-b.log",
                   *other)
    d = dirs["training"]
    (d / "adapters" / "group-0" / "adapter_model.safetensors").unlink()
    with open(d / "scores" / "group-1" / f"{TASKS[0]}.json", "ab") as f:
        f.write(b" ")
    (d / "groups.json").unlink()
    home = dict(env, PREFECT_HOME=str(root / "another-prefect-home"))
    tampered = Run(home, base_args, d, root / "training" / "tampered.log")
    config_b.wait()
    out["config-b-outputs"] = comparable(dirs["reference"])
    again = Run(env, base_args, dirs["reference"], root / "reference" / "config-a-again.log")
    tampered.wait()
    again.wait()
    out["tampered-states"] = states_of(d)
    out["tampered-outputs"] = comparable(d)
    out["again-states"] = states_of(dirs["reference"])
    out["again-outputs"] = comparable(dirs["reference"])
    out["code-changed"] = _code_version() != version
    return out


@pytest.fixture
def ops(scenario):
    """The scenario, unless the library's source changed while it ran: every cache key includes
    a hash of ensemble_core/*.py, so runs of different code share no cache entries."""
    if scenario["code-changed"]:
        pytest.skip("ensemble_core/*.py changed while the runs ran (a working tree in use)")
    return scenario


def test_reference_run_computes_every_task(ops):
    states = ops["reference-states"]
    assert len(states) >= 20 and set(states.values()) == {"Completed"}, states


def test_killed_during_stage_1_resumes(ops):
    s = ops["stage-1"]
    done, manifests = s["done"], s["manifests"]
    assert done and done <= manifests < set(TASKS), (done, manifests)
    assert s["locks"]  # the unfinished tasks held their cache locks when the process died
    states = s["states"]
    for t in TASKS:
        assert states[f"gradients[{t}]"] == ("Cached" if t in done else "Completed"), (t, states)
    assert states["linearity[rte]"] == "Completed"
    assert_same_outputs(s["outputs"], ops["reference"])
    assert_leftovers_ignored(s["planted"])


def test_killed_during_group_training_resumes(ops):
    s = ops["training"]
    done = s["done"]
    assert done and done < set(TRAINED), done
    assert not s["metrics"]
    states = s["states"]
    before = [n for n in states if n.startswith(("gradients[", "linearity[", "subsets["))]
    assert len(before) == len(TASKS) + 1 + 6, states  # 4 tasks, linearity, C(4, 2) subsets
    for name in before + ["affinity-and-groups"]:
        assert states[name] == "Cached", (name, states)
    for name in TRAINED:
        key = "theta-star" if name == "theta-star" else f"train[{name}]"
        assert states[key] == ("Cached" if name in done else "Completed"), (name, states)
    assert_same_outputs(s["outputs"], ops["reference"])
    assert_leftovers_ignored(s["planted"])


def test_bottleneck_pipeline_runs_and_resumes_after_a_kill(ops, cache_dir):
    """adapter.kind: bottleneck through the whole pipeline under the Prefect server: killed
    during group training, resumed; what was finished is served from the cache (same
    files), the rest is computed, and the ensemble predicts with bottleneck members."""
    from ensemble_core.ensemble import EnsembleModel

    s = ops["bottleneck"]
    done = s["done"]
    assert done and done < set(TRAINED), done
    states = s["states"]
    assert set(states.values()) <= {"Completed", "Cached"}, states
    for t in TASKS:
        assert states[f"gradients[{t}]"] == "Cached", states
    for name in TRAINED:
        key = "theta-star" if name == "theta-star" else f"train[{name}]"
        assert states[key] == ("Cached" if name in done else "Completed"), (name, states)
        if name in done:  # the adapter written before the kill is the one the run used
            assert s["after"][name] == s["records"][name]
    outputs = s["outputs"]
    configs = [json.loads(v) for k, v in outputs.items() if k.endswith("adapter_config.json")]
    assert len(configs) == 5 and all(c["peft_type"] == "BOTTLENECK" for c in configs)
    assert all(c["target_modules"] == ["down_proj", "o_proj"] for c in configs)
    assert outputs["metrics.json"]["average"]["ensemble_accuracy"] >= 0
    model = EnsembleModel.from_pretrained(ops["dirs"]["bottleneck"], cache_dir)
    assert len(model.predict("rte", [{"premise": "It rained.", "hypothesis": "It was wet."}])) \
        == 1


def test_two_runs_on_one_output_location(ops):
    """Started together on one run directory (and one empty model cache): each task is computed
    once (the other run waits on its lock and reads the cached result), both finish, and the
    outputs are intact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    run_dir = ops["dirs"]["shared"]
    assert_same_outputs(ops["shared-outputs"], ops["reference"])
    assert not ops["shared-leftovers"], ops["shared-leftovers"]
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["ensemble_lora"])),
            sort=FlowRunSort.START_TIME_DESC, limit=200)
    mine = [r for r in flow_runs if r.parent_task_run_id is None and wrote_to(r, run_dir)]
    assert len(mine) == 2 and all(r.state.is_completed() for r in mine), mine
    both = [{n: st for n, st in task_states(r.id).items()
             if not re.fullmatch(r"[a-z_]+-\d+", n)}  # not the subflows' own runs
            for r in mine]
    assert set(both[0]) == set(both[1]) and len(both[0]) >= 20
    twice = [n for n in both[0] if both[0][n] == both[1][n] == "Completed"]
    assert not twice, f"computed by both runs: {twice}"


def test_changing_one_dataset_recomputes_only_what_depends_on_it(ops):
    states = ops["changed-states"]
    assert states["gradients[cb]"] == "Completed"
    for t in ("rte", "copa", "wic"):
        assert states[f"gradients[{t}]"] == "Cached", (t, states)
    assert states["linearity[rte]"] == "Cached"
    n_with, n_without = 0, 0
    for batch in ops["changed-subsets"]:
        tasks = {t for r in batch["results"] for t in r["tasks"]}
        state = states[f"subsets[{batch['batch']}]"]
        if "cb" in tasks:
            n_with += 1
            assert state == "Completed", (tasks, states)
        else:
            n_without += 1
            assert state == "Cached", (tasks, states)
    assert n_with == 3 and n_without == 3  # the six pairs of four tasks
    assert states["affinity-and-groups"] == "Completed"


def test_a_second_config_then_the_first_again_gives_the_first_results(ops):
    """Issue 17, item 1: config A, then B (2 epochs) on one run directory, then A again. A's
    cache records of stages 4-6 name files that B overwrote: they are not served; the
    stages are computed again and A's outputs come back byte for byte (stage 1, which B
    shares, stays cached)."""
    weights = [k for k in ops["reference"] if k.endswith("adapter_model.safetensors")
               and "theta-star" not in k]
    assert all(ops["config-b-outputs"].get(k) != ops["reference"][k] for k in weights)  # B's
    assert_same_outputs(ops["again-outputs"], ops["reference"])
    states = ops["again-states"]
    for t in TASKS:
        assert states[f"gradients[{t}]"] == "Cached", (t, states)
    for name in ("group-0", "group-1", "all-tasks"):
        assert states[f"train[{name}]"] == "Completed", (name, states)
    assert states["theta-star"] == "Cached"  # the same for both configs


def test_outputs_changed_behind_the_cache_are_recomputed_under_another_prefect_home(ops):
    """Issue 17, items 4 and 5: an adapter's weights deleted, a scores file changed and
    groups.json deleted, then the run resumed with another PREFECT_HOME: exit 0, exactly the
    stages whose files went missing or changed are computed again, and the outputs equal the
    uninterrupted run's."""
    assert_same_outputs(ops["tampered-outputs"], ops["reference"])
    states = ops["tampered-states"]
    assert states["train[group-0]"] == "Completed"
    assert states["affinity-and-groups"] == "Completed"
    assert states[f"scores-fit[{TASKS[0]}]"] == "Completed"  # its group-1 scores changed
    for name in ("train[group-1]", "train[all-tasks]", "theta-star",
                 *(f"scores-fit[{t}]" for t in TASKS[1:]),
                 *(f"gradients[{t}]" for t in TASKS)):
        assert states[name] == "Cached", (name, states)


def test_adapter_directories_keep_the_default_permissions(ops):
    """Issue 17, item 10: adapters are built in a temporary directory renamed into place;
    they get the permissions a plain mkdir gives, not mkdtemp's owner-only 0700."""
    umask = os.umask(0)
    os.umask(umask)
    for d in glob.glob(str(ops["dirs"]["reference"] / "adapters" / "*")):
        assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask, d


def test_ensemble_model_refuses_a_changed_adapter(ops, tmp_path, cache_dir):
    """Issue 17, item 4: ensemble.json records each member's weights digest; a changed
    adapter is an error naming it, not other probabilities."""
    import shutil

    from ensemble_core.ensemble import EnsembleError, EnsembleModel

    from ensemble_core.versions import resolve

    run_dir = tmp_path / "copy"
    shutil.copytree(ops["dirs"]["reference"], run_dir, ignore=shutil.ignore_patterns(".prefect"))
    vid, where = resolve(run_dir)  # what from_pretrained loads: the current version
    assert vid is not None
    spec = json.loads((Path(where) / "ensemble.json").read_text())
    member = spec["groups"][0]["members"][0]
    assert len(member["sha256"]) == 64
    weights = Path(where) / member["adapter"] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    # the version pins every file it holds (issue 36): the changed file is named
    with pytest.raises(EnsembleError, match=r"adapter_model.safetensors: changed since "
                                            r"version v\d+-[0-9a-f]{8} was published"):
        EnsembleModel.from_pretrained(run_dir, cache_dir, check_fingerprint=False)
    # and a run directory without versions checks the weights ensemble.json pins
    shutil.rmtree(run_dir / "versions")
    weights = run_dir / member["adapter"] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(EnsembleError, match="changed since the ensemble was fitted"):
        EnsembleModel.from_pretrained(run_dir, cache_dir, check_fingerprint=False)


# ------------------------------------------------------------------ the pieces, without runs

def test_lock_of_a_dead_process_is_broken_and_a_live_ones_is_kept(tmp_path):
    import socket

    from tasks.locking import RunLockManager, process_start_time

    locks = RunLockManager(lock_files_directory=tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # exited and reaped: its pid names no process now
    for key, pid, started in (("dead", dead.pid, None), ("alive", os.getppid(), None),
                              ("reused", os.getppid(), "1")):  # pid alive, other start time
        (tmp_path / f"{key}.lock").write_text(json.dumps(
            {"holder": "h", "expiration": None, "host": socket.gethostname(), "pid": pid,
             "started": started or process_start_time(pid)}))
    assert not locks.is_locked("dead") and not (tmp_path / "dead.lock").exists()
    assert locks.is_locked("alive") and (tmp_path / "alive.lock").exists()
    if process_start_time(os.getpid()) is not None:  # /proc available
        assert not locks.is_locked("reused")
    # another host cannot be checked: waited for, as with Prefect's own manager
    (tmp_path / "remote.lock").write_text(json.dumps(
        {"holder": "h", "expiration": None, "host": "elsewhere", "pid": dead.pid}))
    assert locks.is_locked("remote")
    # an empty lock file is a writer between its two steps: held, until it is old
    (tmp_path / "empty.lock").write_text("")
    assert locks.is_locked("empty")
    old = time.time() - 120
    os.utime(tmp_path / "empty.lock", (old, old))
    assert not locks.is_locked("empty")
    # acquire, re-acquire (same holder), release; the file names this process
    assert locks.acquire_lock("k", holder="me")
    info = json.loads((tmp_path / "k.lock").read_text())
    assert info["pid"] == os.getpid() and info["holder"] == "me"
    assert locks.acquire_lock("k", holder="me")
    assert not locks.acquire_lock("k", holder="other", acquire_timeout=0.2)
    locks.release_lock("k", holder="me")
    assert not locks.is_locked("k")


def test_cache_record_without_its_payload_is_dropped(tmp_path):
    from tasks.locking import checked_key_fn

    payload = tmp_path / "storage" / "k1"
    payload.parent.mkdir()
    payload.write_text('{"task": "rte"}')
    meta = tmp_path / "cache" / "k1"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"storage_key": str(payload), "storage_block_id": None,
                                "serializer": {"type": "json"}}))
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    key_fn = checked_key_fn(lambda context, parameters: "k1", tmp_path / "cache")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(payload.parent)}):
        assert key_fn(None, {}) == "k1" and meta.exists()  # intact: kept
        payload.write_text('{"task": ')  # cut short
        assert key_fn(None, {}) == "k1" and not meta.exists()
        meta.write_text(json.dumps({"storage_key": str(tmp_path / "gone"),
                                    "storage_block_id": None}))
        assert key_fn(None, {}) == "k1" and not meta.exists()  # payload missing
