# Sourced by deploy.sh: how many GPUs the `gpu` concurrency limit allows, safe under
# `set -euo pipefail` on a machine with no nvidia-smi or no driver (then 1, said on stderr).
#   GPU_SLOTS   given: checked and used as it is; empty: the GPUs `nvidia-smi -L` lists, else 1

gpu_slots() {
  local n="${GPU_SLOTS:-}"
  if [ -z "$n" ]; then
    n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
      # grep -c prints 0 and exits 1 when nothing matches: not a failure here
      n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if [ "${n:-0}" -lt 1 ]; then
      echo "deploy: nvidia-smi lists no GPU here; the gpu limit is 1 (set GPU_SLOTS to the" \
           "number of GPUs your workers have)" >&2
      n=1
    fi
  fi
  case "$n" in
    ''|*[!0-9]*|0) echo "GPU_SLOTS must be a whole number >= 1, got '$n'" >&2; return 2 ;;
  esac
  echo "$n"
}
