#!/usr/bin/env bash
# Creates .venv (once) and installs flaxzoo into it, editable, with its pinned-range dependencies.
# `bash scripts/setup.sh test` also installs the test extras and PyTorch (the `bench` extra, for the
# side-by-side benchmark and its tests). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
extras=""
[ "${1:-}" = "test" ] && extras="[test,bench]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --editable ".${extras}"
