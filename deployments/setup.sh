#!/usr/bin/env bash
# One-time, idempotent setup of EnsembleLoRA as a Prefect service on the server that
# PREFECT_API_URL points at: the `gpu` and `cpu` process work pools, the global concurrency
# limit `gpu` (GPU tasks hold one slot each; GPU_SLOTS=1 runs one at a time over all workers),
# and every deployment of prefect.yaml. Run it again after changing prefect.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_SLOTS="${GPU_SLOTS:-1}"

for pool in gpu cpu; do
  if prefect --no-prompt work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool '$pool' exists"
  else
    prefect --no-prompt work-pool create "$pool" --type process
  fi
done

if prefect --no-prompt gcl inspect gpu >/dev/null 2>&1; then
  echo "global concurrency limit 'gpu' exists"
else
  prefect --no-prompt gcl create gpu --limit "$GPU_SLOTS"
fi

# = `prefect --no-prompt deploy --all`, with a shim for Prefect 3.8.8's client (nulls the server rejects)
# (see deployments/__init__.py: deploy)
python -c 'import deployments; deployments.deploy("--all")'

# Several machines (deployments/README.md, "Several machines"): with RESULTS_URL set (an
# fsspec URL every machine reaches, e.g. s3://bucket/prefect-results), the Prefect block the
# stage flow runs persist their results to, so the orchestrating flow reads them back from any
# machine. Workers then run with
#   PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=remote-file-system/ensemble-lora-results
if [ -n "${RESULTS_URL:-}" ]; then
  python - "$RESULTS_URL" <<'PY'
import sys
from prefect.filesystems import RemoteFileSystem
RemoteFileSystem(basepath=sys.argv[1]).save("ensemble-lora-results", overwrite=True)
print(f"result storage block 'remote-file-system/ensemble-lora-results' at {sys.argv[1]}")
PY
fi
