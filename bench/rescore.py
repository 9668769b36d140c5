"""Stage 5's member scoring of a finished run, called directly (no Prefect, one process): the
forward work alone, and how far scores made under other settings move (issue 11;
BENCHMARKS.md, "Stage 1 and scoring against the code before issue 11" and "Forward passes in
bfloat16"):

    python bench/rescore.py configs/demo.yaml                          # the run's own settings
    python bench/rescore.py configs/demo.yaml --set model.dtype=bfloat16

Every score file of the run directory (scores/<member>/<task>[.test].json) is recomputed with
the member's saved adapter on the same examples (``stages.scored_examples``), the base model
loaded once and the adapters swapped, as ``stages.score_members`` does member by member. Prints the seconds spent loading and in forward passes, the
examples per second, and against the run's stored scores: how many predicted choices agree and
the change of the score differences h_c − h_0 (what the weights and boosting read). With the
run's own settings the scores must come back unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_core.config import load_config  # noqa: E402
from ensemble_core.run import Run  # noqa: E402
from ensemble_core.runtime import member_model  # noqa: E402
from ensemble_core.scoring import predict_scores  # noqa: E402
from ensemble_core.stages import scored_examples  # noqa: E402
from ensemble_core.storage import read_json  # noqa: E402


def score_files(root: Path) -> list[Path]:
    files = sorted(root.glob("scores/*/*.json"))
    if not files:
        raise SystemExit(f"{root}: no scores/<member>/<task>.json files; run the pipeline first")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the re-scoring (e.g. model.dtype=bfloat16); "
                         "the run directory stays the config's")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    run = Run(cfg)
    root = run.dir.local(run.dir.url)
    t_load = t_fwd = 0.0
    n_ex = agree = 0
    deltas: list[float] = []
    files = score_files(root)
    for f in files:
        rec = read_json(str(f))
        name, task = rec["adapter"], rec["task"]
        t = time.perf_counter()
        # run.dir.adapter refuses a name that would leave the run directory
        model, tok = member_model(cfg, run.dir.local(run.dir.adapter(name)), name,
                                  rec["adapter_sha256"])
        t_load += time.perf_counter() - t
        for split, stored in rec["scores"][task].items():
            examples = scored_examples(run, task, split)
            if len(examples) != len(stored):
                raise SystemExit(f"{f}: {len(stored)} {split} scores for {len(examples)} "
                                 f"examples of task {task!r}; the config is not the run's")
            t = time.perf_counter()
            scores = predict_scores(model, tok, examples, cfg.model.max_length,
                                    cfg.estimation.batch_size, cfg.model.choice_mode)
            t_fwd += time.perf_counter() - t
            n_ex += len(examples)
            for new, old in zip(scores, stored):
                new, old = np.asarray(new, float), np.asarray(old, float)
                agree += int(np.argmax(new) == np.argmax(old))
                deltas.append(float(np.abs((new - new[0]) - (old - old[0])).max()))
    d = np.asarray(deltas)
    print(f"{root}: {len(files)} member-task score files, {n_ex} examples, "
          f"model {cfg.model.name} ({cfg.model.dtype})")
    print(f"  loading the base once and the adapters  {t_load:8.1f} s")
    print(f"  forward passes                          {t_fwd:8.1f} s   "
          f"{n_ex / max(t_fwd, 1e-9):.1f} examples/s")
    print(f"  predicted choice as stored              {agree} / {n_ex}")
    print(f"  |change of h_c - h_0|                   median {np.median(d):.2e}, "
          f"95th percentile {np.percentile(d, 95):.2e}, max {d.max():.2e}")
    if args.json:
        print(json.dumps({"files": len(files), "examples": n_ex, "load_s": t_load,
                          "forward_s": t_fwd, "agree": agree, "max_change": float(d.max()),
                          "median_change": float(np.median(d))}))


if __name__ == "__main__":
    main()
