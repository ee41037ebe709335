#!/usr/bin/env bash
# Where podman's defaults cannot run a container on this machine, write a containers.conf
# that can and print its path (for CONTAINERS_CONF); print nothing where the defaults
# work. Some sandboxes (cgroup v1/v2 hybrids, capped rlimits) refuse crun and podman's
# default rlimits; runc with rlimits within this shell's hard limits works there.
# Usage: conf=$(scripts/podman-conf.sh IMAGE) && export CONTAINERS_CONF=${conf:-…}
set -euo pipefail
image=${1:-localhost/fedge-base:bookworm}
unset CONTAINERS_CONF
if podman run --rm --network none "$image" true >/dev/null 2>&1; then
    exit 0
fi
conf=${XDG_CACHE_HOME:-$HOME/.cache}/fedge/containers.conf
mkdir -p "$(dirname "$conf")"
nofile=$(ulimit -Hn)
cat > "$conf" <<CONF
# written by fedge's scripts/podman-conf.sh: podman's defaults could not run a container here
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=4096:4096"]
[engine]
runtime = "runc"
CONF
if CONTAINERS_CONF=$conf podman run --rm --network none "$image" true >/dev/null 2>&1; then
    echo "$conf"
    exit 0
fi
echo "error: podman cannot run a container here, with its defaults or with $conf:" >&2
CONTAINERS_CONF=$conf podman run --rm --network none "$image" true >&2 || true
exit 1
