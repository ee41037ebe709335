#!/usr/bin/env bash
# The base image of deploy/Containerfile, made without a container registry: a minimal
# Debian 12 root filesystem with Python 3.11 (mmdebstrap, from the Debian mirror this
# machine's apt uses) imported into Podman. Usage: scripts/base-image.sh [IMAGE]
set -euo pipefail
image=${1:-localhost/fedge-base:bookworm}
if podman image exists "$image"; then
    echo "$image exists (podman rmi $image to make it again)"
    exit 0
fi
# the mirrors apt uses here: a deb822 .sources file or sources.list lines
sources=""
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list; do
    [ -s "$f" ] && grep -q "bookworm" "$f" && { sources=$f; break; }
done
[ -n "$sources" ] || { echo "error: no Debian bookworm source in /etc/apt" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# essential: the Essential:yes packages only (no apt: mmdebstrap installs from outside); python3 (3.11) and its venv module; the CA
# bundle for TLS; libstdc++ for the C++ inside wheels (NumPy, grpcio). Documentation, manual pages and translations are left out, and so is
# Perl beyond perl-base (47 MB), which usrmerge needs only to merge /usr, merged by then
# (init-system-helpers depends on usrmerge through usr-is-merged: forced; no apt is here).
mmdebstrap --variant=essential --include=python3,python3-venv,ca-certificates,libstdc++6 \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='chroot "$1" dpkg --purge --force-depends usrmerge libfile-find-rule-perl libnumber-compare-perl libtext-glob-perl perl libperl5.36 perl-modules-5.36' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    bookworm "$work/rootfs.tar" "$sources"
podman import --change 'CMD ["/bin/sh"]' --change 'ENV LANG=C.UTF-8' "$work/rootfs.tar" "$image"
podman image ls "$image"
