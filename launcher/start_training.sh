#!/usr/bin/env bash
# The seed system's front door, kept for its users:
#
#   ./launcher/start_training.sh --config production --gpus 2
#   ./launcher/start_training.sh --config production --gpus 2 --resume latest --max-steps 20000
#   ./launcher/start_training.sh --config production --hostfile hosts.txt --no-background-upload
#   ./launcher/start_training.sh --config production --gpus 8 --max-restarts 5     # restart after crashes and hangs
#
# It is neox-launch with the seed's defaults (--config production, --gpus 1 when neither --gpus nor --hostfile is
# given): neox-launch plans the ZeRO stage for the GPUs, runs the pre-flight checks (the seed's "validate setup"),
# and starts neox-train through the deepspeed launcher. Any other neox-launch or neox-train flag passes through.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -x "$repo/.venv/bin/neox-launch" ]]; then
    launch="$repo/.venv/bin/neox-launch"
elif command -v neox-launch >/dev/null 2>&1; then
    launch="$(command -v neox-launch)"
else
    echo "start_training.sh: error: neox-launch not found (run ./setup.sh in $repo first)" >&2
    exit 2
fi

usage() {
    cat <<'EOF'
usage: start_training.sh [--config NAME|FILE] [--gpus N | --hostfile FILE] [--max-steps N] [--resume latest|TAG|URL]
                         [--no-background-upload] [other neox-launch / neox-train flags]

  --config NAME|FILE       run preset (test, production, demo) or JSON file (default: production)
  --gpus N                 GPUs on this machine (default: 1 unless --hostfile is given)
  --hostfile FILE          DeepSpeed hostfile ('HOST slots=N' lines) for a multi-node run
  --max-steps N            optimizer steps to train
  --resume latest|TAG|URL  continue from a checkpoint
  --no-background-upload   upload checkpoints inside the save (debugging)
  --max-restarts N         restart the job after a crash or hang, up to N times (neox-launch's supervisor)

Everything else goes to neox-launch (see: neox-launch --help).
EOF
}

have_config=0
have_where=0
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --config|--gpus|--hostfile|--max-steps|--resume)
            if [[ $# -lt 2 || "$2" == --* ]]; then
                echo "start_training.sh: error: $1 needs a value (see --help)" >&2
                exit 2
            fi
            [[ "$1" == --config ]] && have_config=1
            [[ "$1" == --gpus || "$1" == --hostfile ]] && have_where=1
            args+=("$1" "$2"); shift 2 ;;
        --config=*) have_config=1; args+=("$1"); shift ;;
        --gpus=*|--hostfile=*) have_where=1; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
[[ $have_config -eq 1 ]] || args=(--config production "${args[@]}")
[[ $have_where -eq 1 ]] || args+=(--gpus 1)

echo "start_training.sh: $launch ${args[*]}" >&2
exec "$launch" "${args[@]}"
