#!/usr/bin/env bash
# The main job: set up (idempotently) and run a local 3-region mesh with simulated engines.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_python ""
exec "$KVMESH_VENV/bin/kvmesh" demo "$@"
