#!/usr/bin/env bash
# Issue 20's GPU checks as one prepared script, for a session that is lent a device machine.
#
# That machine has Python 3.12 with PyTorch, Triton, pytest, timm and ONNX, and no network: `make test` cannot build
# its .venv there. The packages the tests need beyond those (nbval, a Jupyter kernel, pycocotools) travel as wheels:
#
#   bash benchmarks/device-check.sh wheels        # here, with the package registry: fills .whl/ (about 15 MB)
#
# and then, on the device machine, from the repository root, with .whl carried (device `run`, carry [".whl"]):
#
#   bash benchmarks/device-check.sh cuda-tests    # the CUDA tests alone (Triton shift, GPU norm): about a minute
#   bash benchmarks/device-check.sh tests         # make test's pytest command: unit tests and notebooks
#   bash benchmarks/device-check.sh eager         # CUDA batch sweep, eager, with the Triton shift and without it
#   bash benchmarks/device-check.sh compiled      # the same sweep with --compile (compiling takes minutes, cold)
#   bash benchmarks/device-check.sh graphs        # the same with --compile-mode reduce-overhead (CUDA graphs)
#
# Several stages may follow one another in one call (`... cuda-tests eager compiled`). A session has 15 minutes of
# device time in all, the machine's start (1-2 min) included, and at most 10 minutes a call; the machine is given
# back 30 s after a call. Estimates from the stored H200 runs: cuda-tests ~1 min, eager ~2 min, compiled ~5.5 min
# (~4 min of it a cold compile), tests ~3-6 min. `cuda-tests eager compiled` fits one call with timeout_s 560;
# `tests` then needs a second call, if time is left. JSON and logs go to $OUT (the device tool brings back at
# most 8 files: the tables go to stdout, which the reply's output_tail holds, and can be rebuilt from the JSON),
# or to runs/device-check here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SWEEP=(bench --device cuda --batches 64,128,256,512)
COMPILED_SWEEP=(bench --device cuda --batches 32,64,128,256,512)
# The packages make test installs that the device image lacks (pyproject's dev extras and their needs, resolved
# against the image's package list in /work/.library/device/KINDS.md), pinned to what CI installs.
WHEELS=(asttokens==3.0.2 comm==0.2.3 debugpy==1.8.22 executing==2.3.0 fastjsonschema==2.22.3 ipykernel==7.4.0
        ipython==9.19.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 jsonschema==4.26.0
        jsonschema-specifications==2025.9.1 jupyter-client==8.10.0 jupyter-core==5.9.1 matplotlib-inline==0.2.2
        nbformat==5.11.1 nbval==0.11.0 nest-asyncio2==1.7.4 parso==0.8.7 pexpect==4.9.0 platformdirs==4.14.9
        prompt-toolkit==3.0.53 ptyprocess==0.7.0 pure-eval==0.2.4 pycocotools==2.0.11 pyzmq==27.3.0
        referencing==0.37.0 rpds-py==2026.9.1 stack-data==0.6.3 tornado==6.6.1 traitlets==5.16.1 wcwidth==0.9.4)

device_python() {  # the image's python3 with the carried wheels and this checkout on its path
  if [[ -z "${DEVICE_SITE:-}" ]]; then
    [[ -d .whl ]] || { echo "device-check: no .whl/ here; run 'bash benchmarks/device-check.sh wheels' first and carry .whl" >&2; exit 2; }
    DEVICE_SITE=/tmp/device-check-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$DEVICE_SITE" .whl/*.whl || exit 1
    export PYTHONPATH="$PWD:$DEVICE_SITE" DEVICE_SITE
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
  fi
}

status=0
for stage in "$@"; do
  case "$stage" in
    wheels)
      mkdir -p .git/info
      grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || exit 1
      du -sh .whl ;;
    cuda-tests)
      device_python
      python3 -m pytest -q -rs -p no:cacheprovider -p no:benchmark tests/test_cuda.py tests/test_fast.py 2>&1 \
        | tee "$OUT/cuda-tests.log" || status=1 ;;
    tests)
      device_python
      # The Makefile's test command (keep the two alike), called directly: the image may have no make, and make test
      # would build .venv. -p no:benchmark: the image's pytest-benchmark plugin also owns pyproject's 'benchmark' marker.
      # The image has pytest-xdist; 4 processes (JOBS=N to change) on its 16 cores.
      OMP_NUM_THREADS=1 python3 -m pytest -q -rs -p no:cacheprovider -p no:benchmark --durations=15 \
        -n "${JOBS:-4}" --dist loadscope --nbval --nbval-current-env --nbval-sanitize-with nbval.cfg notebooks tests \
        2>&1 | tee "$OUT/tests.log" || status=1 ;;
    eager)
      device_python
      python3 -m asmlp_min "${SWEEP[@]}" --json "$OUT/cuda-sweep-eager.json" || status=1
      python3 -c "import sys, asmlp_min.fast as fast, asmlp_min.cli as cli; fast.triton = None; sys.exit(cli.main(sys.argv[1:]))" \
        "${SWEEP[@]}" --no-peers --json "$OUT/cuda-sweep-eager-no-triton.json" || status=1 ;;
    compiled)
      device_python
      # batch 32 first: the batch measured right after a cold compile read low in the stored run (benchmarks/README.md);
      # --max-seconds counts the compile too (about 4 min cold)
      python3 -m asmlp_min "${COMPILED_SWEEP[@]}" --compile --max-seconds 420 --json "$OUT/cuda-sweep.json" || status=1 ;;
    graphs)
      device_python
      python3 -m asmlp_min "${COMPILED_SWEEP[@]}" --compile --compile-mode reduce-overhead --max-seconds 420 \
        --json "$OUT/cuda-sweep-reduce-overhead.json" || status=1 ;;
    *)
      echo "device-check: unknown stage '$stage' (wheels, cuda-tests, tests, eager, compiled, graphs)" >&2; exit 2 ;;
  esac
done
exit $status
