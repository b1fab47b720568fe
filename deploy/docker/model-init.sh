#!/bin/sh
# aisrl-model-init: create the initial policy with `aisrl model init` unless it already exists,
# exactly as `aisrl up` does (aisrl/cluster/up.py, ensure_model): the model is written to
# $AISRL_MODEL_OUT, a sibling directory named <model>.partial, and renamed to <model> only once
# complete, so an interrupted run never leaves a directory that looks like a model. Idempotent:
# compose's model-init service and the Kubernetes model-init Job run it on every start.
# Every setting of `aisrl model init` comes from its environment (AISRL_MODEL_*).
set -eu
out="${AISRL_MODEL_OUT:?set AISRL_MODEL_OUT to <model directory>.partial}"
case "$out" in
  *.partial) ;;
  *) echo "aisrl-model-init: AISRL_MODEL_OUT must end in .partial, got $out" >&2; exit 2 ;;
esac
final="${out%.partial}"
if [ -f "$final/config.json" ]; then
  echo "aisrl-model-init: $final exists, nothing to do"
  exit 0
fi
rm -rf "$out"
aisrl model init "$@"
mv "$out" "$final"
echo "aisrl-model-init: created $final"
