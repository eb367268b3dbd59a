"""Cold first compile of SD1.5's block layout with and without shared graphs, side by side (a benchmark, not a test).

Before torch 2.5 every block compiles on its own; ``lib_optim.compile.sharing`` lets identical blocks share one
inductor compile (issue 16: "the first compile at least halved, ≤ 1 graph per distinct block shape"). Each
variant runs in a fresh process with an empty inductor cache (and, for torch ≥ 2.2, FX graph cache) folder, on
``lib_optim.bench.compile.sd15_like_unet`` (SD1.5's 4 levels, 2 ResBlocks each, attention at levels 0-2, at a
small width: compile time follows the graphs, not the channel count), and prints the seconds, the inductor compiles
and their ratio. Run it with the torch to measure (the hosts' venvs):

    /work/hosts/a1111/venv/bin/python tools/measure_sharing.py --rounds 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def child(share: bool) -> dict[str, Any]:
    """One cold compile in this process: the UNet's blocks compiled, one forward (clocked)."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from lib_optim.bench.compile import sd15_like_unet
    from lib_optim.compile.regional import RegionalCompiler

    torch.manual_seed(0)
    unet = sd15_like_unet().eval()
    x, t, context = torch.randn(2, 4, 32, 32), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 64)
    compiler = RegionalCompiler(share_graphs=share, eager_first_call=False)
    with torch.no_grad():
        expected = unet(x, t, context)
        with compiler.apply(unet, ("ResBlock", "SpatialTransformer"), key=("sd15-like", share)) as app:
            start = time.perf_counter()
            out = unet(x, t, context)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            unet(x, t, context)
            steady = time.perf_counter() - start
    stats = app.stats
    return {
        "share": share,
        "torch": torch.__version__,
        "seconds": seconds,
        "steady_seconds": steady,
        "blocks": stats.blocks,
        "graphs": stats.graphs,
        "shared_graphs": stats.shared_graphs,
        "inductor_compiles": stats.graphs - stats.shared_graphs,
        "graph_breaks": stats.graph_breaks,
        "max_abs_diff": float((out - expected).abs().max()),
        "phases": phases(),
    }


def phases() -> dict[str, float]:
    """Dynamo's own compile-time metrics, summed per timed function (``torch._dynamo.utils.dynamo_timed``):
    the whole frame compile (``…compile_inner``), the backend's part of it (``OutputGraph.call_user_compiler``:
    AOTAutograd and inductor), AOTAutograd's (``create_aot_dispatcher_function``) and inductor's lowering and code
    generation (``GraphLowering.*``, ``Scheduler.*``)."""
    from torch._dynamo import utils

    return {
        name.rsplit(".", 1)[-1] if "<locals>" in name else name: sum(values)
        for name, values in utils.compilation_time_metrics.items()
    }


def split(figures: dict[str, Any]) -> str:
    """``tracing 61.2 s, backend 38.0 s`` — dynamo's tracing vs what the backend took (AOTAutograd + inductor)."""
    times = figures.get("phases", {})
    frame = next((v for k, v in times.items() if k.endswith("compile_inner")), None)
    backend = times.get("OutputGraph.call_user_compiler")
    if frame is None or backend is None:
        return "phases unknown"
    return f"dynamo tracing {frame - backend:.1f} s, backend (AOTAutograd + inductor) {backend:.1f} s"


def run(share: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="optim-sharing-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
        done = subprocess.run(
            [sys.executable, __file__, "--child", "on" if share else "off"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs, interleaved")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(child(args.child == "on")) + "\n")
        return 0
    rounds = [{"off": run(False), "on": run(True)} for _ in range(args.rounds)]
    for pair in rounds:
        off, on = pair["off"], pair["on"]
        pair["ratio"] = off["seconds"] / on["seconds"]
        sys.stdout.write(
            f"torch {on['torch']}: cold compile of {on['blocks']} blocks — per block {off['seconds']:.1f} s "
            f"({off['inductor_compiles']} inductor compiles), shared {on['seconds']:.1f} s "
            f"({on['inductor_compiles']} inductor compiles, {on['shared_graphs']} graphs reused): "
            f"{pair['ratio']:.2f}× faster\n"
            f"  per block: {split(off)}; shared: {split(on)}\n"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
