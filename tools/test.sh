#!/usr/bin/env bash
# The test command (README "Run the tests"). Installs what it needs into virtualenvs under .ci-venvs/,
# then: ruff, mypy, Python 3.10 check, the test suite with real torch (CPU), and the UI/API tests under
# the gradio and fastapi versions each host pins (A1111 v1.10.1: gradio 3.41.2 + fastapi 0.94.0 +
# pydantic 1; Forge f2: gradio 4.40.0 + fastapi 0.104.1 + pydantic 2.8.2).
# Host integration tests run too when OPTIM_A1111_DIR / OPTIM_FORGE_DIR name a WebUI checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
VENVS=.ci-venvs
PIP_QUIET=(-q --disable-pip-version-check)

make_venv() {
    local name=$1
    shift
    if [ ! -x "$VENVS/$name/bin/python" ]; then
        "$PY" -m venv "$VENVS/$name"
    fi
    "$VENVS/$name/bin/python" -m pip install "${PIP_QUIET[@]}" "$@"
}

echo "== installing test requirements"
make_venv main "torch==2.13.0" "pytest>=8" "ruff>=0.5" "mypy>=1.8" "vermin>=1.6" nvidia-ml-py jsonschema fastapi httpx \
    einops  # einops: the compile tests compare our traceable stand-ins with it
make_venv gradio-3.41.2 "gradio==3.41.2" "fastapi==0.94.0" "pydantic==1.10.15" "httpx==0.24.1" "numpy==1.26.2" \
    "huggingface-hub==0.26.2" "pytest>=8"
make_venv gradio-4.40.0 "gradio==4.40.0" "fastapi==0.104.1" "pydantic==2.8.2" "httpx==0.24.1" "numpy==1.26.2" \
    "huggingface-hub==0.26.2" "pytest>=8"

MAIN="$VENVS/main/bin"
echo "== ruff"
"$MAIN/ruff" check .
"$MAIN/ruff" format --check .
echo "== mypy"
"$MAIN/mypy"
echo "== Python 3.10 compatibility (vermin)"
"$MAIN/vermin" -t=3.10- --no-tips --violations --eval-annotations lib_optim scripts preload.py install.py

echo "== tests (torch $("$MAIN/python" -c 'import torch; print(torch.__version__)'))"
PATH="$MAIN:$PATH" "$MAIN/python" -m pytest -p no:cacheprovider "$@"

for gradio in 3.41.2 4.40.0; do
    echo "== UI and API tests under gradio $gradio"
    "$VENVS/gradio-$gradio/bin/python" -m pytest -p no:cacheprovider tests/test_ui.py tests/test_ui_optim_tab.py tests/test_api.py
done
