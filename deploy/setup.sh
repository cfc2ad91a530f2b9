#!/usr/bin/env bash
# Sets up everything kvmesh needs on a Debian machine, idempotently.
#   deploy/setup.sh          Python venv with kvmesh (enough for `kvmesh demo`)
#   deploy/setup.sh --full   plus the test extras, Redis, Chromium, Prometheus, Docker
#                            (+ docker-compose), the base and kvmesh images, and the CPU build
#                            of vLLM (its own venv, shared by every clone on the machine)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ "${1:-}" = "--full" ]; then
    ensure_python test
    ensure_envoy
    ensure_redis
    ensure_chromium
    ensure_prometheus
    ensure_openssl
    ensure_docker
    ensure_compose
    ensure_base_image
    ensure_kvmesh_image
    ensure_vllm
else
    ensure_python ""
fi
log "ready"
