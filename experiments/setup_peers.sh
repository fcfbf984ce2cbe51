#!/bin/sh
# Creates .peers/, the other engines' own environment for the decode kind's `experiment.peers`
# (experiments/peer_bench.py runs in it; jaxinfer's .venv never imports any of it):
# torch + transformers, OpenVINO GenAI with optimum-intel and nncf (conversion and weight
# compression), llama-cpp-python (built here for this CPU) and gguf. ~3 min plus the llama.cpp build
# (~20 min on 2 cores).
#   sh experiments/setup_peers.sh                     (python3)
#   PEER_PYTHON=python3.11 TORCH='torch==2.13.0+cpu' sh experiments/setup_peers.sh
# torch: the CPU build from download.pytorch.org is tried first (PyPI's carries CUDA libraries).
set -eu
cd "$(dirname "$0")/.."
py=${PEER_PYTHON:-python3}
torch=${TORCH:-torch}
[ -x .peers/bin/python ] || "$py" -m venv .peers
pip=".peers/bin/python -m pip"
$pip install -q "$torch" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null || $pip install -q "$torch"
$pip install -q transformers "optimum-intel[openvino]" "openvino-genai==2026.4.1.0" nncf "gguf==0.19.0" safetensors
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" $pip install -q "llama-cpp-python==0.3.36"
echo "setup_peers.sh: peers installed in .peers ($(.peers/bin/python --version)); experiment.peers finds it there"
