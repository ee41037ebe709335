#!/usr/bin/env bash
# `make images`: build fedge's container images with Podman (deploy/Containerfile).
#   localhost/fedge-node:VERSION  the edge node (the core and prometheus-client: NODE_EXTRAS,
#                                 default "observe")
#   localhost/fedge:VERSION       server and serve (EXTRAS, default "serve")
# Installs podman and mmdebstrap (apt) if missing, makes the Debian base image
# (scripts/base-image.sh), and lets pip in the build use this machine's package index
# and settings: every `pip config` value becomes a PIP_* build argument, and the local
# files and directories they name (CA bundle, constraints, file:// indexes) are mounted
# read-only at the same paths.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
base=localhost/fedge-base:bookworm
python=${PYTHON:-python3}

missing=()
for tool in podman mmdebstrap runc; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    echo "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" uidmap
fi
scripts/base-image.sh "$base"
conf=$(scripts/podman-conf.sh "$base")
[ -n "$conf" ] && export CONTAINERS_CONF=$conf

# this machine's pip settings, as build arguments and mounts
build_args=()
mounts=()
while IFS= read -r line; do
    key=${line%%=*}
    key=${key##*.}
    value=${line#*=}
    value=${value#\'}
    value=${value%\'}
    name=PIP_$(echo "$key" | tr 'a-z-' 'A-Z_')
    build_args+=(--build-arg "$name=$value")
    for item in $value; do
        path=${item#file://}
        # a simple index (…/simple) links to its files beside it: mount its parent
        [ "${path##*/}" = simple ] && [ "$path" != "$item" ] && path=$(dirname "$path")
        [ "${path:0:1}" = / ] && [ -e "$path" ] && mounts+=(--volume "$path:$path:ro")
    done
done < <("$python" -m pip config list 2>/dev/null)

build() {  # build TAG EXTRAS
    echo "building $1 (extras: ${2:-none})"
    podman build --format docker --network host -f deploy/Containerfile \
        --build-arg "BASE=$base" --build-arg "EXTRAS=$2" \
        "${build_args[@]}" "${mounts[@]}" -t "$1" .
}
build "localhost/fedge-node:$version" "${NODE_EXTRAS:-observe}"
build "localhost/fedge:$version" "${EXTRAS:-serve}"
podman image ls --filter reference='localhost/fedge*'
