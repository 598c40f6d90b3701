#!/usr/bin/env bash
# The GPU check: one script, a few minutes on a one-GPU machine, that prints a short report.
#   1. device_query;
#   2. engine GPU against CPU: LeNet and the BatchNorm ResNet-20, forward and backward, same
#      weights and inputs (TF32 off: float32 on both);
#   3. LeNet trained on the GPU (the bundled solver, 2,000 iterations): test accuracy >= 0.97;
#   4. `mpirun -np 2` sharing one GPU through the MPI path (--comm mpi: staged through host
#      memory, or CUDA-aware MPI where Open MPI has it);
#   5. NCCL with one rank: the process group bootstrapped over MPI, an all_reduce on the GPU;
#   6. --precision bf16 and fp16 on the GPU (the digits net) against fp32;
#   7. ms per iteration, GPU against CPU (`mpicaffe time`, LeNet).
# Usage, from the repository root after scripts/setup.sh:  scripts/gpu_check.sh [GPU_ID]
# Every step prints PASS or FAIL with its numbers; the exit status is the number of failures.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then . .venv/bin/activate; fi
GPU=${1:-0}
WORK=$(mktemp -d /tmp/mpicaffe-gpu-check.XXXXXX)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
FAILURES=0
START=$(date +%s)

step() { printf '\n== %s\n' "$1"; }
result() {  # result NAME STATUS DETAIL
    printf '%s %s: %s\n' "$2" "$1" "$3" | tee -a "$WORK/report.txt"
    [ "$2" = PASS ] || FAILURES=$((FAILURES + 1))
}
accuracy() { grep -o 'Test net output #0: accuracy = [0-9.]*' "$1" | tail -1 | awk '{print $NF}'; }

step "device_query"
if mpicaffe device_query --gpu "$GPU" 2>&1 | tee "$WORK/query.log"; then
    result device_query PASS "$(grep -m1 'Name:' "$WORK/query.log" | sed 's/.*Name: *//')"
else
    result device_query FAIL "no usable CUDA device $GPU"
    cat "$WORK/report.txt"
    exit 1
fi

step "data"
[ -d data/mnist/mnist_train_lmdb ] || mpicaffe convert mnist --out data/mnist >/dev/null 2>&1
[ -d data/digits/digits_train_lmdb ] || mpicaffe convert digits --out data/digits >/dev/null 2>&1
mkdir -p examples_out/lenet

step "engine GPU against CPU (forward and backward)"
python scripts/gpu_parity.py "cuda:$GPU" 2>&1 | tee "$WORK/parity.log"
while read -r status name rest; do
    [ "$status" = PASS ] || [ "$status" = FAIL ] && result "parity $name" "$status" "$rest"
done < <(grep -E '^(PASS|FAIL) ' "$WORK/parity.log")
grep -qE '^(PASS|FAIL) ' "$WORK/parity.log" || result parity FAIL "the parity script did not run (see above)"

step "LeNet trained on the GPU"
t0=$(date +%s)
mpicaffe train --solver prototxt/lenet/lenet_solver.prototxt --gpu "$GPU" > "$WORK/lenet.log" 2>&1
acc=$(accuracy "$WORK/lenet.log")
if awk "BEGIN{exit !(${acc:-0} >= 0.97)}"; then status=PASS; else status=FAIL; fi
result "LeNet on GPU $GPU" $status "test accuracy ${acc:-none} after 2000 iterations in $(( $(date +%s) - t0 )) s"

step "mpirun -np 2 sharing one GPU (MPI path)"
sed -e 's/^max_iter: .*/max_iter: 300/' -e 's/^test_interval: .*/test_interval: 300/' \
    prototxt/lenet/lenet_solver.prototxt > "$WORK/lenet300_solver.prototxt"
if mpirun -np 2 --oversubscribe mpicaffe train --solver "$WORK/lenet300_solver.prototxt" --gpu "$GPU" \
        --comm mpi --check-every 50 > "$WORK/np2.log" 2>&1; then
    result "np 2 on one GPU (--comm mpi)" PASS "test accuracy $(accuracy "$WORK/np2.log") after 300 iterations"
else
    result "np 2 on one GPU (--comm mpi)" FAIL "$(tail -3 "$WORK/np2.log" | tr '\n' ' ')"
fi

step "NCCL with one rank"
if python - "$GPU" > "$WORK/nccl.log" 2>&1 <<'PY'
import sys
import torch
from mpicaffe.parallel.comm import create_communicator
from mpicaffe.parallel.process_group import ProcessGroup

device = f"cuda:{sys.argv[1]}"
group = ProcessGroup(create_communicator(), "nccl", device)
t = torch.arange(4, dtype=torch.float32, device=device)
group.all_reduce(t)
group.close()
assert t.tolist() == [0.0, 1.0, 2.0, 3.0], t
print("all_reduce on", device, "over NCCL:", t.tolist())
PY
then result "NCCL, one rank" PASS "$(tail -1 "$WORK/nccl.log")"
else result "NCCL, one rank" FAIL "$(tail -2 "$WORK/nccl.log" | tr '\n' ' ')"; fi

step "mixed precision on the GPU (digits net)"
for precision in fp32 bf16 fp16; do
    ( cd "$WORK" && ln -sfn "$OLDPWD/prototxt" prototxt && ln -sfn "$OLDPWD/data" data &&
      mpicaffe train --solver prototxt/digits/digits_solver.prototxt --gpu "$GPU" --precision $precision \
          > "$WORK/$precision.log" 2>&1 )
    acc=$(accuracy "$WORK/$precision.log")
    if [ -n "$acc" ]; then result "--precision $precision" PASS "digits test accuracy $acc"
    else result "--precision $precision" FAIL "$(tail -2 "$WORK/$precision.log" | tr '\n' ' ')"; fi
done

step "ms per iteration, GPU against CPU (mpicaffe time, LeNet, batch 64)"
for where in gpu cpu; do
    flag=(); [ $where = gpu ] && flag=(--gpu "$GPU")
    mpicaffe time --model prototxt/lenet/lenet_train_val.prototxt --iterations 50 "${flag[@]}" \
        > "$WORK/time_$where.log" 2>&1
    grep -o 'Average Forward-Backward: [0-9.]* ms' "$WORK/time_$where.log" | awk '{print $3}' > "$WORK/ms_$where"
done
gpu_ms=$(cat "$WORK/ms_gpu"); cpu_ms=$(cat "$WORK/ms_cpu")
if [ -n "$gpu_ms" ] && [ -n "$cpu_ms" ]; then
    result "time" PASS "$gpu_ms ms on the GPU, $cpu_ms ms on the CPU ($(awk "BEGIN{printf \"%.1f\", $cpu_ms / $gpu_ms}")x)"
else
    result "time" FAIL "see $WORK/time_gpu.log"
fi

printf '\n== report (%d s, logs in %s)\n' "$(( $(date +%s) - START ))" "$WORK"
cat "$WORK/report.txt"
exit $FAILURES
