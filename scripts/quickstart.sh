#!/usr/bin/env bash
# Fresh machine to first edit: install, then edit the bundled sample clip with the real model.
#
#   bash scripts/quickstart.sh                 # writes out/sample_edit.mp4 (+ side by side, + .yaml)
#   MODEL=/path/to/sd-2-1-base bash scripts/quickstart.sh      # a local diffusers folder or another hub id
#   bash scripts/quickstart.sh --prompt "..."  # extra arguments go to tokenflow-edit (and win)
#
# When the model's weights are neither in the Hugging Face cache nor downloadable (offline machine),
# it says so and falls back to the built-in tiny random model, whose output is MEANINGLESS: that run
# only shows that everything is installed and wired up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
mkdir -p out

MODEL=${MODEL:-$(python -c "from tokenflow.config import DEFAULT_MODEL; print(DEFAULT_MODEL)")}
PROMPT=${PROMPT:-"a stained glass window with a glowing red orb and a blue mosaic tile"}

# Where would the weights come from? local | cached | download | missing
where=$(MODEL="$MODEL" python - <<'EOF'
import os
m = os.environ["MODEL"]
if os.path.exists(os.path.expanduser(m)):
    print("local"); raise SystemExit
try:
    from huggingface_hub import snapshot_download
    snapshot_download(m, local_files_only=True, allow_patterns=["*/config.json", "scheduler/*", "tokenizer/*"])
    print("cached"); raise SystemExit
except SystemExit:
    raise
except Exception:
    pass
from tokenflow.models import hub_reachable  # a plain connect with a short timeout
offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
print("download" if not offline and hub_reachable() else "missing")
EOF
)

ARGS=(sample --prompt "$PROMPT" -o out/sample_edit.mp4 --side-by-side --overwrite)
if [ "$where" = missing ]; then
    cat >&2 <<EOF

################################################################################################
 The model '$MODEL' is not in the Hugging Face cache and cannot be downloaded from here.
 Falling back to --model tiny-random: RANDOM weights, the output is MEANINGLESS. This run only
 checks the installation. To get a real edit, either
   - on a connected machine: hf download $MODEL   (then copy ~/.cache/huggingface to this one), or
   - point MODEL at a local diffusers folder:      MODEL=/path/to/model bash scripts/quickstart.sh
   - or run tokenflow-edit yourself with           --model PATH (folder or .safetensors + --model-config)
################################################################################################

EOF
    ARGS+=(--model tiny-random --width 256 --height 144 --n-inversion-steps 10 --n-timesteps 5)
else
    [ "$where" = download ] && echo "quickstart: downloading $MODEL into the Hugging Face cache (a few GB, once)" >&2
    ARGS+=(--model "$MODEL")
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        # The full job (48 frames, 500 inversion steps, 50 sampling steps) is GPU work; on a CPU it would
        # run for hours. Shorten it unless asked not to.
        if [ "${QUICKSTART_FULL:-0}" != 1 ]; then
            echo "quickstart: no CUDA GPU: running a shortened job on the CPU (16 frames, 50 inversion steps," \
                 "25 sampling steps; still slow). QUICKSTART_FULL=1 runs the full one." >&2
            ARGS+=(--frames 16 --n-inversion-steps 50 --n-timesteps 25)
        fi
    fi
fi

tokenflow-edit "${ARGS[@]}" "$@"
echo "quickstart: the edit is in out/sample_edit.mp4 (input | edit: out/sample_edit_side_by_side.mp4," \
     "settings: out/sample_edit.yaml)" >&2
