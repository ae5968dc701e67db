#!/usr/bin/env bash
# The whole procedure on a GPU machine without network access (docs/gpu.md), as one command: `make gpu-check`.
# Unpacks the wheels `make gpu-wheels` fetched into .whl/ (carried with the tree) into a temporary folder put first
# on PYTHONPATH, runs the GPU tests, then the GPU benchmark. Logs, pytest's JUnit XML and the benchmark's JSON and
# Markdown land in $OUT when it is set (else runs/gpu_check). Each part runs even if one before it
# failed; the exit status is the first failure's. Meant to finish in under 8 minutes on an H200.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-runs/gpu_check}"
python="${PYTHON:-python3}"
mkdir -p "$out"
stamp() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/progress.log"; }
status=0
site="$(mktemp -d)"
stamp "unpacking .whl/ into $site"
if ! ls .whl/*.whl > /dev/null 2>&1; then
  stamp "no wheels in .whl/: run 'make gpu-wheels' where pip works, and carry .whl"
  exit 2
fi
"$python" scripts/gpu_wheels.py --install .whl --target "$site" > "$out/install.log" 2>&1 || status=$?
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" - > "$out/versions.txt" 2>&1 <<'PY' || status=$((status ? status : $?))
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "safetensors", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
PY
cat "$out/versions.txt"
stamp "pytest -m gpu"
"$python" -m pytest -m gpu tests/gpu -v -rs -p no:cacheprovider --junitxml="$out/pytest.xml" 2>&1 \
  | tee "$out/pytest.log"
code=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && status=$code
stamp "pytest exit $code; benches/cost/bench_gpu.py"
"$python" benches/cost/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.log"
code=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && status=$code
stamp "bench exit $code; done (status $status)"
exit "$status"
