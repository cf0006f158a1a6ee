#!/usr/bin/env bash
# One prepared check for a GPU box (issue 5), within 8 minutes, results in one JSON:
#   1. CUDA vs CPU logits parity (tiny qwen2_moe, fp32, MoEModel)
#   2. cold start of Qwen1.5-MoE-shaped blocks: disk and host tier -> device, against a pinned-copy floor
#      (bench/coldstart.py --device cuda)
#   3. decode tokens/s: full model (serve --experts in-process) vs FaaSMoE with warm experts, on cuda
#   4. the paper comparison, bench/paper.py --quick --device cuda
#   5. quantized experts (FP8, GPTQ act order, AWQ) on the device against the CPU (bench/gpu_check.py quantized)
#
# On the device machine (torch preinstalled, no network), from the repo root:
#     bash bench/gpu_check.sh                 -> $OUT/gpu_check.json (+ paper.md, paper.json, paper_memory.png, log)
# Wheels of packages missing there (bench/gpu_wheels.sh) are installed from .whl/ when present: name
# ".whl" in the device tool's carry. Without a GPU, to exercise the script itself:
#     bash bench/gpu_check.sh --cpu-dry-run   -> bench/results/gpu_check/gpu_check.json (tiny model, cpu, toy sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # 8 minutes, less a margin for the merge and the copy back
START=$(date +%s)
DEST=${OUT:-$ROOT/bench/results/gpu_check}
mkdir -p "$DEST"
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
LOG=$DEST/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1

if [[ $DRY == 1 && -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=${PYTHON:-python3}; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # the package itself, uninstalled

if [[ $DRY == 1 ]]; then
  DEVICE=cpu; SIZE=--toy; COLD_BLOCKS=4; PAPER_ARGS=(--toy --setups baseline,faasmoe-shared)
else
  DEVICE=cuda; SIZE=--quick; COLD_BLOCKS=1,4,20; PAPER_ARGS=(--quick --device cuda)
fi

STATUS=$WORK/status.json
echo "{}" >"$STATUS"
# step NAME CAP_S CMD...: run CMD under the smaller of CAP_S and the time left; record rc and seconds.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET_S - ($(date +%s) - START) - 10))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "== $name: skipped, ${left}s left" | tee -a "$LOG"
    "$PY" - "$STATUS" "$name" skipped 0 <<'EOF'
import json, sys
p, name, rc, s = sys.argv[1:]
d = json.load(open(p)); d[name] = {"rc": rc, "seconds": float(s)}; json.dump(d, open(p, "w"))
EOF
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
  "$PY" - "$STATUS" "$name" "$rc" "$(($(date +%s) - t0))" <<'EOF'
import json, sys
p, name, rc, s = sys.argv[1:]
d = json.load(open(p)); d[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": float(s)}
json.dump(d, open(p, "w"))
EOF
}

step env 30 "$PY" - "$WORK/env.json" <<'EOF'
import json, os, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    info["nvidia_smi"] = f"unavailable: {exc}"
for mod in ("aiohttp", "uvloop", "msgpack", "psutil", "pynvml", "tokenizers", "jinja2", "matplotlib", "tqdm"):
    try:
        m = __import__(mod); info[f"{mod}_version"] = getattr(m, "__version__", "present")
    except Exception as exc:
        info[f"{mod}_version"] = f"MISSING: {exc}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF

step parity 120 "$PY" bench/gpu_check.py parity --device "$DEVICE" --out "$WORK/parity.json"

step quantized 60 "$PY" bench/gpu_check.py quantized --device "$DEVICE" --out "$WORK/quantized.json"

step checkpoint 90 "$PY" bench/paper.py $SIZE --build-only
MODEL=$("$PY" bench/paper.py $SIZE --build-only 2>/dev/null | tail -1)

step coldstart 90 "$PY" bench/coldstart.py --device "$DEVICE" --model-dir "$MODEL" --blocks "$COLD_BLOCKS" --reps 3 \
  --dtype "$( [[ $DRY == 1 ]] && echo float32 || echo bfloat16 )" --out "$WORK/coldstart.json"

step decode 150 "$PY" bench/gpu_check.py decode --device "$DEVICE" --model-dir "$MODEL" --out "$WORK/decode.json"

step paper 330 "$PY" bench/paper.py "${PAPER_ARGS[@]}" --out-dir "$WORK/paper"

"$PY" bench/gpu_check.py merge --out "$DEST/gpu_check.json" status="$STATUS" env="$WORK/env.json" \
  parity="$WORK/parity.json" quantized="$WORK/quantized.json" coldstart="$WORK/coldstart.json" decode="$WORK/decode.json" \
  paper="$WORK/paper/paper.json" >/dev/null
"$PY" - "$DEST/gpu_check.json" <<'EOF'
import json, sys
p = sys.argv[1]
d = json.load(open(p))
paper = d.get("paper", {})
for s in paper.get("setups", []):  # the summary travels in gpu_check.json; the full paper.json beside it
    s.pop("timeline", None); s.pop("heat_map", None)
json.dump(d, open(p, "w"), indent=1)
EOF
for f in paper.md paper.json paper_memory.png; do
  [[ -f $WORK/paper/$f ]] && cp "$WORK/paper/$f" "$DEST/$f"
done
echo "wrote $DEST/gpu_check.json in $(($(date +%s) - START))s" | tee -a "$LOG"
cat "$WORK/paper/paper.md" 2>/dev/null | sed -n '/^## Setups/,/^## Per tenant/p'
rm -rf "$WORK"
