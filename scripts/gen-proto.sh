#!/bin/bash
# Regenerate Hull's protobuf modules (src/hull/shim/proto/*_pb2.py and .pyi) from its
# own .proto files with grpcio-tools and mypy-protobuf. Importing hull.shim.proto also
# does this when the .proto files changed; this script is for CI and fresh checkouts.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-/opt/hull/venv/bin/python}
PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" "$python" -m hull.shim.proto
