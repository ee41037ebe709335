#!/usr/bin/env bash
# System packages the tests need beyond Python: a software TPM 2.0 (swtpm) and tpm2-tools,
# for enrollment with TPM attestation; Eclipse Mosquitto, the MQTT broker; iproute2 and
# nftables, for the fault drills' lab network (fedge.netlab); prometheus for promtool, which
# checks and unit-tests deploy/prometheus's alert rules and lints real scrapes (where apt
# starts services, Debian's Prometheus starts on :9090 too: `systemctl disable --now
# prometheus` if it is not wanted); Chromium, which Playwright drives in the dashboard
# tests (never a browser Playwright downloads); a monitor, an OSD and the RADOS Gateway of
# Ceph, for the model registry's tests on a real single-node Ceph RGW (fedge.store.cephrgw).
# Installs only what is missing (apt, as root or sudo).
set -euo pipefail
packages=(swtpm swtpm-tools tpm2-tools mosquitto iproute2 nftables prometheus chromium
          ceph-mon ceph-osd radosgw ceph-common)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
echo "installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
