#!/usr/bin/env bash
# Moves a stage's outputs between the jobs of the reusable pipeline through a model store (a folder every GPU runner
# mounts), without trusting anything that could have been forged on the way:
#   handoff.sh put STAGE   copy $OUT_DIR/STAGE (checkpoints and merged/ left out) to $STORE/$REPO/$KEY/STAGE
#   handoff.sh get STAGE…  copy them back into $OUT_DIR
# Settings come from the environment: STORE, REPO (owner/name), KEY (the run's store key), OUT_DIR, and for `put`
# FRESH=true when this is the first stage of the run (its whole folder is replaced: a re-run leaves nothing behind).
# KEY comes from a step output that code running in the job could have written: it is checked before it names a
# folder, and so is every path it builds; nothing is removed outside $STORE/$REPO.
set -euo pipefail

fail() { echo "::error::handoff: $*" >&2; exit 2; }

[ $# -ge 2 ] || fail "usage: handoff.sh put|get STAGE…"
action="$1"; shift
: "${STORE:?STORE is not set}" "${REPO:?REPO is not set}" "${KEY:?KEY is not set}" "${OUT_DIR:?OUT_DIR is not set}"
[[ "$KEY" =~ ^[a-z0-9][a-z0-9._-]*$ ]] && [[ "$KEY" != *..* ]] || fail "store key '$KEY' is not a store key (a-z, 0-9, . _ -)"
[[ "$REPO" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]] && [[ "$REPO" != *..* ]] || fail "repository '$REPO' is not owner/name"
[[ "$STORE" = /* ]] || fail "model-store '$STORE' is not an absolute path"
for stage in "$@"; do
  case "$stage" in train|evaluate|quantize|deploy) ;; *) fail "'$stage' is not a stage" ;; esac
done
run_dir="$STORE/$REPO/$KEY"

case "$action" in
  put)
    [ $# -eq 1 ] || fail "put takes one stage"
    stage="$1"
    [ -d "$OUT_DIR/$stage" ] || fail "$OUT_DIR/$stage does not exist: the stage wrote nothing to hand on"
    if [ "${FRESH:-false}" = "true" ]; then rm -rf -- "$run_dir"; fi
    rm -rf -- "${run_dir:?}/$stage"
    mkdir -p -- "$run_dir"
    tar --exclude=checkpoints --exclude=merged -C "$OUT_DIR" -cf - "$stage" | tar -C "$run_dir" -xf -
    echo "$stage outputs handed on in $run_dir/$stage"
    ;;
  get)
    mkdir -p -- "$OUT_DIR"
    for stage in "$@"; do
      if [ ! -d "$run_dir/$stage" ]; then
        fail "$run_dir/$stage does not exist: is model-store mounted on this runner, the same folder as on the $stage job's?"
      fi
      rm -rf -- "${OUT_DIR:?}/$stage"
      tar -C "$run_dir" -cf - "$stage" | tar -C "$OUT_DIR" -xf -
    done
    ;;
  *) fail "'$action' is neither put nor get" ;;
esac
