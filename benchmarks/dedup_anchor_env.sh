#!/usr/bin/env bash
# Creates (if missing) the virtual environment of the data-preparation benchmark's streaming MinHash anchor
# (datatrove) and prints its python path on the last line of stdout, for `benchmarks/dedup_anchor.py`.
#
#   DEDUP_ANCHOR_VENV  where the venv lives (default: .venv-dedup-anchor at the repository root)
#   PYTHON             the interpreter that creates it (default: python3)
#
# datatrove's core with the modules its readers and MinHash steps import (xxhash < 4: datatrove hashes str, which
# xxhash 4 refuses); not its `processing` extra, whose NLTK tokenizer data cannot be downloaded offline (the anchor
# passes its own word tokenizer). text-dedup, the other streaming MinHash implementation, does not install beside
# current packages (it pins urllib3<=2.0 and rich<14) and is left out.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${DEDUP_ANCHOR_VENV:-.venv-dedup-anchor}"
PYTHON="${PYTHON:-python3}"
DATATROVE="datatrove==0.10.1"
STAMP="$VENV/.dedup-anchor-installed"

if [ ! -f "$STAMP" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    {
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q "$DATATROVE" "xxhash<4" numpy regex tokenizers orjson
    } 1>&2
    touch "$STAMP"
fi
echo "$(cd "$VENV" && pwd)/bin/python"
