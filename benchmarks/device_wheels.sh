#!/usr/bin/env bash
# The server's Python packages as wheels for the GPU machine (no network, no pip index there;
# its image has anyio, h11, httpx, but not FastAPI / pydantic / uvicorn / sse-starlette).
# Run here, in the repository root, at the start of a session that will run
# benchmarks/serve_load.py there (the folder is git-ignored):
#   bash benchmarks/device_wheels.sh            # -> .whl/
# Then in the device call: carry [".whl"] and begin the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:.
# The versions are the ones this project's CI installs (pip list of the test venv).
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 uvicorn==0.55.0
sse-starlette==3.7.1 opentelemetry-api==1.45.3 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0"
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pkgs
ls .whl
