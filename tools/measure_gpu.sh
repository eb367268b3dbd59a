#!/usr/bin/env bash
# One GPU report in one command (issue 16 §5): attention backends × fp16/bf16 at SD1.5 512² and SDXL 1024²,
# eager vs regional compile (on, max-autotune; cold and warm cache, compile seconds, extra memory), the VAE
# decode whole vs tiled at 1024² and 2048² — within a 450 s budget, so it fits one lent H100 session.
# No WebUI needed: torch and triton as installed in $PYTHON (default python3).
#
#   tools/measure_gpu.sh [--out DIR] [--budget SECONDS] [--parts attention,vae,compile] [--device cuda|cpu]
#                        [--quick] [--dtype fp16|bf16|fp32] [--compile-backend inductor|aot_eager|eager] [--json]
#
# Writes DIR/gpu-report.json and DIR/gpu-report.md (default DIR: ./optim-gpu-report) and prints the table.
# The figures go to docs/figures.md ("GPU report"). Every argument goes to `python -m lib_optim bench --gpu-report`.
set -euo pipefail

PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# Run from the caller's folder (a relative --out is theirs); lib_optim comes from this checkout.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# --device cuda first: a --device given to this script comes later and wins.
exec "$PY" -m lib_optim bench --gpu-report --device cuda "$@"
