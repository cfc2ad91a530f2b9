#!/usr/bin/env bash
# The whole test suite: set up (idempotently), then lint, type-check and run every test
# (unit, property, integration, real vLLM engines, chaos). Exits non-zero on any failure and
# when no test ran.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start=$(date +%s)
"$KVMESH_ROOT/deploy/setup.sh" --full
cd "$KVMESH_ROOT"
py="$KVMESH_VENV/bin/python"
export KVMESH_BASE_IMAGE KVMESH_IMAGE TESTCONTAINERS_RYUK_DISABLED=true
export KVMESH_VLLM_PYTHON="$KVMESH_VLLM_VENV/bin/python"  # tests/real: real vLLM engines

log "ruff check"
"$py" -m ruff check .
log "mypy --strict"
"$py" -m mypy
log "pytest"
set +e
"$py" -m pytest "$@"
rc=$?
set -e
log "total wall time $(( $(date +%s) - start )) s"
if [ "$rc" -eq 5 ]; then die "pytest collected no tests"; fi
exit "$rc"
