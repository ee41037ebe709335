#!/usr/bin/env bash
# Regenerate the committed Python code for proto/fedge/v1/*.proto.
#
# The virtual include mapping "-Ifedge/proto=proto" makes protoc see the files as
# fedge/proto/fedge/v1/*.proto, so the generated imports read
# "from fedge.proto.fedge.v1 import fleet_pb2" and work from the installed package.
#
# Usage: scripts/gen_proto.sh            (uses $PYTHON, else .venv/bin/python, else python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

out=src/fedge/proto/fedge/v1
mkdir -p "$out"
rm -f "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py

"$python" -m grpc_tools.protoc \
  -Ifedge/proto=proto \
  --python_out=src \
  --pyi_out=src \
  --grpc_python_out=src \
  proto/fedge/v1/*.proto

# Package markers so the generated modules import as fedge.proto.fedge.v1.*
for pkg in src/fedge/proto src/fedge/proto/fedge "$out"; do
  [[ -f "$pkg/__init__.py" ]] || : > "$pkg/__init__.py"
done

echo "generated: $(cd "$out" && ls ./*_pb2*.py* | tr '\n' ' ')"
