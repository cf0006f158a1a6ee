#!/usr/bin/env bash
# Download, here, the wheels of our Python dependencies that the GPU box lacks, for its Python
# (3.12, x86-64 manylinux), into .whl/ at the repo root; bench/gpu_check.sh installs them there
# from .whl/ (name ".whl" in the device tool's carry). Versions are the ones in this checkout's
# .venv, so both machines run the same code.
#
#     bash bench/gpu_wheels.sh               # what the test suite needs beyond the box: pytest-asyncio
#     bash bench/gpu_wheels.sh --with-openai # + openai and its dependencies missing there (~4 MB)
#     bash bench/gpu_wheels.sh --dest DIR    # somewhere else than .whl/
#
# The box already has torch, aiohttp, uvloop, msgpack, psutil, nvidia-ml-py, tokenizers, jinja2,
# safetensors, numpy, tqdm, matplotlib, pytest and pytest-timeout (/work/.library/device/KINDS.md):
# bench/gpu_check.sh itself needs no wheel. .whl/ must be git-ignored (it is not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
WANT=(pytest-asyncio)
while [[ $# -gt 0 ]]; do
  case $1 in
    --with-openai) WANT+=(openai); shift ;;
    --dest) DEST=$2; shift 2 ;;
    *) echo "usage: $0 [--with-openai] [--dest DIR]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
if [[ $DEST == .whl ]] && ! git check-ignore -q .whl/x.whl; then
  echo "warning: .whl/ is not git-ignored here; add '.whl/' to .gitignore (or /.whl/ to .git/info/exclude)" >&2
fi
mkdir -p "$DEST"

# Pins: the requested packages and, recursively, their requirements for Python 3.12 on Linux,
# minus what the box has (typing-extensions is kept: pydantic needs a newer one than it may have).
mapfile -t PINS < <("$PY" - "${WANT[@]}" <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

ON_BOX = {"torch", "aiohttp", "uvloop", "msgpack", "psutil", "nvidia-ml-py", "tokenizers", "jinja2", "markupsafe",
          "safetensors", "numpy", "tqdm", "matplotlib", "pytest", "pytest-timeout", "pluggy", "iniconfig",
          "packaging", "anyio", "idna", "certifi", "h11", "httpx", "httpcore", "pygments"}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
todo, pins = [norm(n) for n in sys.argv[1:]], {}
while todo:
    name = todo.pop()
    if name in pins or name in ON_BOX:
        continue
    pins[name] = md.version(name)
    for text in md.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            todo.append(norm(req.name))
for name, version in sorted(pins.items()):
    print(f"{name}=={version}")
EOF
)
echo "downloading into $DEST: ${PINS[*]}"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PINS[@]}"
ls -la "$DEST"
du -sh "$DEST"
