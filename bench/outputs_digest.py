"""The digests of a finished run directory's outputs, to compare two runs byte for byte (a
refactor that must not change behaviour; docs/design.md, "Extending"):

    python bench/outputs_digest.py RUN_DIR > a.json
    python bench/outputs_digest.py OTHER_RUN_DIR | diff a.json -

sha256 (16 hex) of metrics.json less its timings (the compute section's seconds, ratios and
peak memory), groups.json, affinity.json, ensemble.json, predictions.json, baselines.json's
accuracies and answers, every adapter's adapter_config.json and adapter_model.safetensors,
every stage-1 Parquet file, and every score file's scores.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def digests(root: Path) -> dict[str, str]:
    out = {}
    metrics = json.loads((root / "metrics.json").read_text())
    metrics["compute"] = {k: v for k, v in metrics["compute"].items()
                          if not (k.endswith("_s") or k.startswith("ratio")
                                  or k == "peak_memory_bytes")}
    out["metrics.json (less timings)"] = _h(_canonical(metrics))
    for name in ("groups.json", "affinity.json", "ensemble.json", "predictions.json"):
        if (root / name).exists():
            out[name] = _h((root / name).read_bytes())
    if (root / "baselines.json").exists():
        res = json.loads((root / "baselines.json").read_text())["results"]
        out["baselines.json (accuracy, answers)"] = _h(_canonical(
            {m: {"accuracy": r["accuracy"], "answers": r["answers"]} for m, r in res.items()}))
    for p in sorted((root / "adapters").rglob("*")):
        if p.name in ("adapter_config.json", "adapter_model.safetensors"):
            out[str(p.relative_to(root))] = _h(p.read_bytes())
    for p in sorted((root / "gradients").rglob("*.parquet")):
        out[str(p.relative_to(root))] = _h(p.read_bytes())
    for p in sorted((root / "scores").rglob("*.json")):
        out[str(p.relative_to(root))] = _h(_canonical(json.loads(p.read_text())["scores"]))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/outputs_digest.py RUN_DIR")
    json.dump(digests(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    print()
