#!/usr/bin/env bash
# The checks that need a GPU, as one command for the device tool (README, "Checks on a GPU"). Run from the repo root on the
# GPU machine with the wheels of `python tools/gpu_wheels.py` carried in `.whl/`:
#     bash tools/gpu_check.sh          # logs go to $OUT (the device tool brings them back), else /tmp/gpu_check
# Exit status 0 when every required step passed. The last step, the whole suite on a machine with a GPU, is for information.
# To try the script on a machine without a GPU first: SFT_NB_GPU_CHECK_ON_CPU=1 bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ "${SFT_NB_GPU_CHECK_ON_CPU:-0}" = 1 ] || export SFT_NB_REQUIRE_CUDA=1

failed=()
step() {  # step NAME SECONDS COMMAND...: run, keep the whole log in $OUT/NAME.log, show its tail
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    echo "== $name"
    timeout "$secs" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
    tail -n 12 "$OUT/$name.log"
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    [ $rc = 0 ] || failed+=("$name")
}

{ nvidia-smi -L 2>&1 | head -2; uname -m; $PY --version; } | tee "$OUT/machine.log"
step install 180 $PY -m pip install --no-index --no-deps --disable-pip-version-check .whl/*.whl
$PY -m pip check >"$OUT/pip_check.log" 2>&1; head -n 20 "$OUT/pip_check.log"
step versions 120 $PY -c "
import torch, bitsandbytes, transformers, peft, trl, datasets, accelerate, sft_nb
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
print(*(f'{m.__name__} {m.__version__}' for m in (bitsandbytes, transformers, peft, trl, datasets, accelerate, sft_nb)), sep=', ')
assert sft_nb.__file__.startswith('$PWD'), sft_nb.__file__"

# Issue 6: QLoRA on CUDA. The CPU cases of these files run too (pinned to the CPU), so a GPU machine is checked for both.
step adapters 300 $PY -m pytest -q -rs -p no:cacheprovider tests/test_adapters.py
step trainer_qlora 300 $PY -m pytest -q -rs -p no:cacheprovider tests/test_trainer.py -k qlora
step models 300 $PY -m pytest -q -rs -p no:cacheprovider tests/test_models.py
step notebook_03_gpu 300 env SFT_NB_TEST_FLAGS=gpu $PY -m pytest -q -p no:cacheprovider tests/test_notebooks.py -k 03_adapters
required=("${failed[@]}")

# For information: everything else, on a machine where a GPU is visible (as for a tutorial reader with one).
step suite 200 $PY -m pytest -q -rs -p no:cacheprovider -n 8 --ignore=tests/test_adapters.py tests/
echo "required steps failed: ${required[*]:-none}; all failed: ${failed[*]:-none}" | tee "$OUT/summary.log"
[ ${#required[@]} = 0 ]
