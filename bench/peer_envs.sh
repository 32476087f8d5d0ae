#!/usr/bin/env bash
# Creates one virtual environment per peer library for bench/peers.py, under $HFQUANT_PEER_VENVS
# (default /work/venvs). Each reuses this Python's torch and transformers (--system-site-packages);
# the constraints keep pip from replacing them (an unpinned torch would pull a multi-GB CUDA build).
# Versions measured: optimum-quanto 0.2.7, torchao 0.18.0, hqq 0.2.8.post1, bitsandbytes 0.50.2,
# llmcompressor 0.14.0.1 (compressed-tensors 0.19.0), with torch 2.13.0+cpu and transformers 5.24.0.
set -euo pipefail
root="${HFQUANT_PEER_VENVS:-/work/venvs}"
mkdir -p "$root"
python -c "import torch, transformers; print(f'torch=={torch.__version__.split(\"+\")[0]}'); print(f'transformers=={transformers.__version__}')" \
  > "$root/constraints.txt"
declare -A packages=([quanto]=optimum-quanto==0.2.7 [torchao]=torchao==0.18.0 [hqq]=hqq==0.2.8.post1
                     [bnb]=bitsandbytes==0.50.2)
for name in "${!packages[@]}" llmcompressor; do
  [ -x "$root/$name/bin/python" ] || python -m venv --system-site-packages "$root/$name"
done
for name in "${!packages[@]}"; do
  "$root/$name/bin/pip" install -q -c "$root/constraints.txt" "${packages[$name]}" \
    || echo "peer_envs: $name failed to install; bench/peers.py reports its rows as missing" >&2
done
# No llmcompressor release accepts torch 2.13 with transformers 5.24 (0.14 pins transformers<=5.17,
# 0.12 torch<=2.12): pip says ResolutionImpossible. Installed without that pin; its GPTQ, save and
# reload ran with transformers 5.24 (`pip check` still lists the conflict).
"$root/llmcompressor/bin/pip" install -q -c "$root/constraints.txt" --no-deps llmcompressor==0.14.0.1
"$root/llmcompressor/bin/pip" install -q -c "$root/constraints.txt" compressed-tensors==0.19.0 \
  "auto-round>=0.14.1,<=0.15.1" "loguru>=0.7.2" "nvidia-ml-py>=12.560.30" "pillow>=10.4.0"
# llama.cpp for bench/export.py (--llama-python "$root/llamacpp/bin/python"): llama-cpp-python built from its
# source distribution, CPU only, without its tools and server (0.3.36 took 36 min with one compile job on a
# busy 2-core machine).
[ -x "$root/llamacpp/bin/python" ] || python -m venv --system-site-packages "$root/llamacpp"
CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" "$root/llamacpp/bin/pip" install -q -c "$root/constraints.txt" \
  --no-binary llama-cpp-python llama-cpp-python==0.3.36 diskcache \
  || echo "peer_envs: llama-cpp-python failed to build; bench/export.py skips its llama.cpp rows" >&2
