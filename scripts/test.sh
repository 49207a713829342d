#!/usr/bin/env bash
# Set up with the test dependencies (idempotent) and run the whole test suite: CPU only, a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if [ -z "${TFORMER_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export TFORMER_DATA_DIR=$(cd ../shared/data && pwd)
fi
exec "${PYTHON:-python3}" -m pytest "$@"
