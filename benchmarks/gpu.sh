#!/usr/bin/env bash
# The one prepared run for a machine with a CUDA GPU (see README, "On a GPU").
#
#   bash benchmarks/gpu.sh            # figures land in $OUT (default ./gpu-out)
#
# 1. benchmarks/gpu_audit.py: `fwdecomp audit --device cuda` for every registered
#    decomposition (one process each): its samples on CUDA tensors, through the
#    AutogradCUDA kernels, checked against central finite differences with
#    forward AD, torch.func.jvp and reverse mode.
# 2. benchmarks/gpu_attention.py: the fused CUDA attention operators' JVP
#    against the math backend, then time and memory at seq 1024..16384.
# 3. pytest (where installed) on the test files that run on CUDA where there is
#    one (the ZeroTensor kernels, mixed CPU/CUDA operands) or that probe private
#    PyTorch APIs, with CUDA present: CPU-only CI never does.
# 4. benchmarks/backends.py --device cuda: eager against graph backend.
# Each step has its own time limit and writes its files as it goes.
set -u
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
{ nvidia-smi -L; "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";
  "$PYTHON" -m fwdecomp router; } | tee "$OUT/device.txt"   # which router (builds the compiled one, ~10 s)
timeout "${AUDIT_SECONDS:-200}" "$PYTHON" benchmarks/gpu_audit.py --out "$OUT" 2>&1 | tee "$OUT/gpu_audit.log"
echo "audit exit status ${PIPESTATUS[0]}"
timeout "${ATTENTION_SECONDS:-300}" "$PYTHON" benchmarks/gpu_attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_attention.log"
echo "attention exit status ${PIPESTATUS[0]}"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    timeout "${PYTEST_SECONDS:-150}" "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="-ra" \
        tests/test_zero_tensors.py tests/test_attention.py tests/test_attention_mask.py tests/test_torch_internals.py \
        tests/test_enable.py tests/test_tangent_rules.py tests/test_transforms.py tests/test_stack.py tests/test_router.py \
        > "$OUT/gpu_pytest.log" 2>&1
    echo "pytest exit status $?"
    tail -n 25 "$OUT/gpu_pytest.log"
else
    echo "pytest is not installed here: step 3 skipped" | tee "$OUT/gpu_pytest.log"
fi
# 4. benchmarks/backends.py on CUDA: eager against graph backend, per operator (short timings)
timeout "${BACKENDS_SECONDS:-150}" "$PYTHON" benchmarks/backends.py --device cuda --repeats 5 --target 0.02 \
    > "$OUT/gpu_backends.md" 2>&1
echo "backends exit status $?"
tail -n 60 "$OUT/gpu_backends.md"
