#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one run, for a lent GPU machine: run it once with a timeout that
# leaves time to rerun it, then give the machine back. Results (JSON + logs) go to $OUT (default gpu-results/).
#
#   REFERENCE=.reference/REPA-E bash benchmarks/gpu_suite.sh
#
# REFERENCE: a checkout of github.com/End2End-Diffusion/REPA-E inside the working tree (e.g. `.reference/`, which
# git ignores; carry it to the machine), for the side-by-side step; skipped when unset. Weights are random
# (`repae bench` default) and the data synthetic: nothing is downloaded.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
HEADLINE=recipes/repae_sdvae_dinov2.yaml
BENCH=(--synthetic-data --json --steps 10 --warmup 3)
step() { echo "== $1"; shift; "$@" || echo "FAILED ($?): $*"; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$OUT/torch.txt"
# The headline REPA-E step at per-GPU batch 32, LPIPS on: eager bf16, then each switch on top.
step "eager" repae bench $HEADLINE trainer.batch_size=32 "${BENCH[@]}" > "$OUT/bench_eager.json"
step "channels_last off" repae bench $HEADLINE trainer.batch_size=32 trainer.channels_last=false "${BENCH[@]}" \
    > "$OUT/bench_no_channels_last.json"
step "compile" env TORCH_LOGS=recompiles repae bench $HEADLINE trainer.batch_size=32 trainer.compile=true \
    "${BENCH[@]}" > "$OUT/bench_compile.json" 2> "$OUT/compile_recompiles.log"
step "checkpointing" repae bench $HEADLINE trainer.batch_size=32 "trainer.activation_checkpointing=[tokenizer, denoiser]" \
    "${BENCH[@]}" > "$OUT/bench_checkpointing.json"
step "batch 64 + checkpointing" repae bench $HEADLINE trainer.batch_size=64 \
    "trainer.activation_checkpointing=[tokenizer, denoiser]" "${BENCH[@]}" > "$OUT/bench_b64_checkpointing.json"
# No host-device synchronisation inside the step: CUDA reports every synchronising call as a warning.
step "sync debug" python - > "$OUT/sync_debug.txt" 2>&1 <<'PY'
import torch
from repae.build import build_recipe
from repae.plugins import load_plugins
from repae.recipe import read_recipe
from repae.train.data import StepOrder

resolved = read_recipe("recipes/repae_sdvae_dinov2.yaml", ["trainer.batch_size=8", "trainer.num_workers=0",
    "dataset={name: synthetic, resolution: 256, num_classes: 1000, num_images: 64}"], load_plugins().registry)
trainer = next(b.component for b in build_recipe(resolved, device="cuda", load_weights=False) if b.slot == "trainer")
trainer.setup()
order = StepOrder(len(trainer.dataset), 8, 1, 1, 0, 0)
loader = iter(trainer.loader(order, 0, 3))
for step in range(3):
    x, y = next(loader)
    inputs = trainer.make_inputs(step, 0, x, y, order)
    torch.cuda.set_sync_debug_mode("warn" if step == 2 else 0)
    trainer.train_step([inputs], step)
    torch.cuda.set_sync_debug_mode(0)
print("done")
PY
# Engine tests on this machine (DDP with NCCL needs 2 GPUs; the CPU ones run as in CI).
step "tests" env OMP_NUM_THREADS=4 python -m pytest -q -x -p no:cacheprovider tests/test_train_engine.py \
    tests/test_bench.py > "$OUT/tests.txt" 2>&1
if [ -n "${REFERENCE:-}" ]; then
    step "vs reference" python benchmarks/vs_reference.py --reference "$REFERENCE" --device cuda --json \
        > "$OUT/vs_reference.json" 2> "$OUT/vs_reference.log"
fi
ls -la "$OUT"
