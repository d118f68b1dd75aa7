#!/usr/bin/env bash
# Creates (if missing) the virtual environment of the drift benchmark's anchors (Evidently, alibi-detect) and prints
# its python path on the last line of stdout, for `benchmarks/drift_anchors.py`.
#
#   DRIFT_ANCHORS_VENV  where the venv lives (default: .venv-drift-anchors at the repository root)
#   PYTHON              the interpreter that creates it (default: python3)
#
# The CPU wheel of PyTorch is installed first and pinned for the later installs (an unpinned torch pulls a multi-GB
# CUDA build, and alibi-detect's torch extra would otherwise let pip pick another one). Each anchor is installed on
# its own: one that fails to install is left out (the runner then reports it as unavailable, with the error), and
# the script still succeeds. A stamp file records a finished install; delete the venv to reinstall.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${DRIFT_ANCHORS_VENV:-.venv-drift-anchors}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
EVIDENTLY="evidently>=0.7,<0.8"
ALIBI="alibi-detect[torch]==0.13.0"
STAMP="$VENV/.drift-anchors-installed"

if [ ! -f "$STAMP" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    PIN="$VENV/torch-pin.txt"
    echo "$TORCH" > "$PIN"
    {
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q "$TORCH"
        "$VENV/bin/pip" install -q -c "$PIN" "$ALIBI" || echo "drift anchors: alibi-detect failed to install" >&2
        "$VENV/bin/pip" install -q -c "$PIN" "$EVIDENTLY" || echo "drift anchors: evidently failed to install" >&2
    } 1>&2
    touch "$STAMP"
fi
echo "$(cd "$VENV" && pwd)/bin/python"
