#!/usr/bin/env bash
# Reproduces docs/flow-run-report.png: starts a throwaway Prefect server on 127.0.0.1 (its own
# PREFECT_HOME), runs the tiny pipeline against it, and has headless Chromium photograph the UI
# page of the run's report artifact. Needs `chromium` (Debian: apt-get install -y chromium) and
# the benchmark data (ENSEMBLE_LORA_DATA, default ../shared/data). About a minute.
#
#   docs/make_screenshot.sh [output.png]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/flow-run-report.png}"
export ENSEMBLE_LORA_DATA="${ENSEMBLE_LORA_DATA:-$(cd .. && pwd)/shared/data}"

python - "$OUT" <<'PY'
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from deployments import local_server

out = Path(sys.argv[1]).resolve()
with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp) / "home") as env:
    subprocess.run(["ensemble-lora", "run", "configs/tiny.yaml", "--set", f"output_dir={tmp}/run",
                    "--set", f"data_root={env['ENSEMBLE_LORA_DATA']}"],
                   env=env, check=True, stdout=subprocess.DEVNULL)

    # the report artifact (a plain request: Prefect 3.8.8's read_artifacts sends nulls that
    # Prefect 3.8.8's server rejects with 422)
    body = json.dumps({"artifacts": {"key": {"any_": ["tiny-report"]}}, "sort": "ID_DESC",
                       "limit": 1, "offset": 0}).encode()
    req = urllib.request.Request(env["PREFECT_API_URL"] + "/artifacts/filter", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        [report] = json.load(r)
    ui = env["PREFECT_API_URL"].removesuffix("/api")
    url = f"{ui}/artifacts/artifact/{report['id']}"  # the report, and a link to its flow run
    print(f"photographing {url}")
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000", "--virtual-time-budget=15000",
                    f"--screenshot={out}", url],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
PY
