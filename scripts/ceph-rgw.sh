#!/usr/bin/env bash
# A throwaway single-node Ceph cluster (one monitor, one BlueStore OSD on a file) with a
# RADOS Gateway on 127.0.0.1, to try the model registry against a real S3 server:
#   scripts/ceph-rgw.sh start DIR   # prints the AWS_* variables to export (also in DIR/env)
#   scripts/ceph-rgw.sh stop DIR    # kills its daemons and removes DIR
# Needs Debian's ceph-mon, ceph-osd, radosgw and ceph-common (scripts/system-deps.sh).
# The work is done by fedge.store.cephrgw, which the tests and benchmarks use too.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m fedge.store.cephrgw "$@"
