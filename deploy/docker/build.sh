#!/usr/bin/env bash
# Build Cornserve's container images without an image registry (see docs/operations.md, "Containers").
#
#   deploy/docker/build.sh [control] [sidecar] [node] [vllm]     (default: control sidecar node)
#
# 1. The base image is a Debian bookworm root filesystem made from Debian's packages
#    (mmdebstrap --variant=minbase, with python3 and python3-venv), imported with `docker import`.
# 2. Each image installs the Python packages of its role from the committed uv.lock
#    (`uv sync --locked --no-editable`), so an image holds exactly the locked versions.
# The machine's CA bundle ($SSL_CERT_FILE) is handed to the builder stage only (the index may be
# reachable only through it); no final image contains it. The classic builder is used
# (DOCKER_BUILDKIT=0): no secret or cache mounts are needed.
#
# An image is tagged cornserve-<target>:<package version> and labelled with a hash of everything
# that goes into it (lock, pyproject files, sources, Dockerfile); a target whose image already
# carries the same hash is skipped, so a second run builds nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

BASE_TAG="cornserve-base:bookworm"
VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("packages/cornserve-cli/pyproject.toml", "rb"))["project"]["version"])')"
# The builder installs the uv that runs here: `$UV` (set by `uv run`), else uv on PATH, else pip's.
if [ -n "${UV:-}" ]; then uv_cmd=("$UV"); elif command -v uv >/dev/null; then uv_cmd=(uv); else uv_cmd=(python3 -m uv); fi
UV_VERSION="$("${uv_cmd[@]}" --version | awk '{print $2}')"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(control sidecar node)
export DOCKER_BUILDKIT=0

say() { echo "build.sh: $*" >&2; }

for target in "${TARGETS[@]}"; do
  case "$target" in control | sidecar | node | vllm) ;; *) say "unknown target '$target' (control, sidecar, node, vllm)"; exit 2 ;; esac
done

# ---- base image: Debian packages only ------------------------------------------------------------
if ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null || { say "mmdebstrap is missing (apt-get install -y mmdebstrap)"; exit 1; }
  say "making $BASE_TAG from Debian packages (mmdebstrap) ..."
  rootfs="$(mktemp -d)/rootfs.tar"
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --aptopt='Acquire::Retries "3"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$rootfs"
  docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/sh"]' \
    "$rootfs" "$BASE_TAG" >/dev/null
  rm -rf "$(dirname "$rootfs")"
fi

# ---- the hash of what goes into the Python images --------------------------------------------------
# Uncommitted changes count too: hash the working tree's files, not only the index.
tree_hash() {
  find uv.lock pyproject.toml packages deploy/docker examples \
    \( -name __pycache__ -o -name '*.pyc' -o -name .ca \) -prune -o -type f -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
HASH="$(tree_hash)-$(docker image inspect --format '{{.Id}}' "$BASE_TAG" | cut -c8-19)"

# ---- the CA bundle, for the builder stage only -----------------------------------------------------
CA_DIR="deploy/docker/.ca"
rm -rf "$CA_DIR"
mkdir -p "$CA_DIR"
trap 'rm -rf "$ROOT/$CA_DIR"' EXIT
if [ -n "${SSL_CERT_FILE:-}" ] && [ -f "$SSL_CERT_FILE" ]; then
  cp "$SSL_CERT_FILE" "$CA_DIR/ca.crt"
else
  cp /etc/ssl/certs/ca-certificates.crt "$CA_DIR/ca.crt"
fi

for target in "${TARGETS[@]}"; do
  tag="cornserve-$target:$VERSION"
  have="$(docker image inspect --format '{{index .Config.Labels "org.cornserve.source-hash"}}' "$tag" 2>/dev/null || true)"
  if [ "$have" = "$HASH" ]; then
    say "$tag is up to date (source hash $HASH)"
    continue
  fi
  say "building $tag (source hash $HASH) ..."
  started=$SECONDS
  log="$(mktemp)"
  if ! docker build \
    --file deploy/docker/Dockerfile \
    --target "$target" \
    --build-arg "BASE=$BASE_TAG" \
    --build-arg "UV_VERSION=$UV_VERSION" \
    --label "org.cornserve.source-hash=$HASH" \
    --label "org.cornserve.version=$VERSION" \
    --tag "$tag" --tag "cornserve-$target:latest" \
    . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    say "building $tag failed (whole log: $log)"
    exit 1
  fi
  rm -f "$log"
  size="$(docker image inspect --format '{{.Size}}' "$tag")"
  say "built $tag in $((SECONDS - started)) s: $((size / 1024 / 1024)) MiB"
done
