#!/bin/bash
# The whole test suite, on a fresh Debian 12 machine as root: sets the host up, builds the
# guest kernel and image (cached), then runs unit, lint and VM integration tests.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup-host.sh"
hull kernel build
hull image build
cd "$repo"
exec /opt/hull/venv/bin/python -m pytest -p no:cacheprovider "$@" tests
