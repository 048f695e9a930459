#!/usr/bin/env bash
# The GPU measurements of docs/gpu.md in one run, written to one JSON file (first argument, default
# out/gpu-check.json; an existing file is refused): the device, the torch and diffusers versions, the date, one
# denoiser call of a DiT-XL/2-shaped model timed eager, under DeeDiff's hooks and compiled
# (`python -m ee_diffusion.bench.gpu_check`), and the rows of four `ee-diffusion bench` runs. Needs a CUDA device
# (exits with status 2 without one); meant to take under 8 minutes on one GPU. `make gpu-check` runs it with the
# project's virtual environment; elsewhere set PYTHON to the Python that has ee-diffusion installed.
set -euo pipefail

out="${1:-out/gpu-check.json}"
python="${PYTHON:-python}"

if [ -e "$out" ]; then
    echo "gpu-check: $out exists; move it away, or give another file as the first argument." >&2
    exit 2
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: torch ($python) sees no CUDA device (torch.cuda.is_available() is False): run it on a machine" \
        "with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi

runs="$(mktemp -d)"
keep_or_remove_runs() {  # on failure the bench runs made so far stay, and the script says where
    local status=$?
    if [ "$status" -eq 0 ]; then
        rm -rf "$runs"
    else
        echo "gpu-check: failed (exit status $status); the runs made so far are in $runs" >&2
    fi
}
trap keep_or_remove_runs EXIT

bench() {  # bench NAME OPTIONS...: one `ee-diffusion bench` run, its rows to $runs/NAME.json
    local name="$1"
    shift
    echo "gpu-check: ${SECONDS} s: ee-diffusion bench $*"
    "$python" -m ee_diffusion.cli bench "$@" --json "$runs/$name.json"
}

xl=(--model random:dit-xl-2 --dtype bfloat16 --device cuda --steps 25 --scheduler dpm-solver++ --batch-size 32
    --num-samples 64 --methods baseline,ase:linear:0.5,fbcache:0.08)
bench dit-xl-2 "${xl[@]}"
bench dit-xl-2-compiled "${xl[@]}" --compile
bench digits-dit-deediff --model digits-dit --device cuda --steps 50 --batch-size 250 \
    --methods baseline,deediff:0.05,deediff:0.07
bench digits-dit-default --model digits-dit --device cuda --steps 10 --batch-size 100

echo "gpu-check: ${SECONDS} s: one denoiser call of random:dit-xl-2, batch 64, bf16"
"$python" -m ee_diffusion.bench.gpu_check "$out" "$runs"/dit-xl-2.json "$runs"/dit-xl-2-compiled.json \
    "$runs"/digits-dit-deediff.json "$runs"/digits-dit-default.json
echo "gpu-check: done in ${SECONDS} s"
