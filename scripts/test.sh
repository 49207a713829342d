#!/usr/bin/env bash
# Set up with the test dependencies (idempotent) and run the whole test suite: CPU only, a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if [ -z "${TFORMER_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export TFORMER_DATA_DIR=$(cd ../shared/data && pwd)
fi
# Two workers (pytest-xdist), a test file per worker at a time (module fixtures run once); each
# worker takes half the threads (tests/conftest.py). TFORMER_TEST_WORKERS=0 runs in one process.
WORKERS=${TFORMER_TEST_WORKERS:-2}
if [ "$WORKERS" = 0 ]; then exec "${PYTHON:-python3}" -m pytest "$@"; fi
exec "${PYTHON:-python3}" -m pytest -n "$WORKERS" --dist loadfile "$@"
