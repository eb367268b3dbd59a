"""Measure regional compile in a real WebUI, side by side in one run (a benchmark, not a test).

Starts the host the way the integration tests do (tests/integration/conftest.py: ``OPTIM_<HOST>_DIR`` names the
checkout, a random-weight SD1.5 checkpoint and a random LoRA are made for it) and prints, for SD1.5 on that
host's device:

1. seconds per sampling step, eager vs compiled, at 512², interleaved round by round (a busy machine slows both
   alike), as medians and their ratio; the first compiled generation's compile seconds and compile count;
2. compiles over 6 compiled generations alternating 512² and 576²;
3. the largest pixel difference, compiled vs eager with the same seed, without and with the LoRA.

    OPTIM_A1111_DIR=... python tools/measure_levers.py a1111 --steps 4 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from conftest import LORA, start_webui, stop_webui


def _image(body: Any) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")


def _max_diff(a: Any, b: Any) -> int:
    from PIL import ImageChops

    return max(high for _, high in ImageChops.difference(a, b).getextrema())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host", choices=("a1111", "forge", "forge-previous", "reforge"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alt-steps", type=int, default=2, help="steps of the 6 alternating-size generations")
    parser.add_argument(
        "--parts",
        default="steps,alternating,lora",
        help="comma-separated: steps (1: step time, compile, pixel diff), alternating (2), lora (3)",
    )
    parser.add_argument("--mode", default="on", choices=("on", "max-autotune"), help="the compile mode to measure")
    parser.add_argument("--size", type=int, default=512, help="image side for part 1")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    webui = start_webui(args.host)
    out: dict[str, Any] = {
        "host": args.host,
        "steps": args.steps,
        "rounds": args.rounds,
        "alt_steps": args.alt_steps,
        "mode": args.mode,
        "size": args.size,
    }
    try:

        def generate(
            settings: dict[str, Any], size: int | None = None, prompt: str = "a cat", steps: int | None = None
        ) -> tuple[Any, dict[str, Any]]:
            started = time.monotonic()
            code, body = webui.txt2img(
                [settings],
                prompt=prompt,
                seed=7,
                steps=steps or args.steps,
                width=size or args.size,
                height=size or args.size,
            )
            if code != 200:
                raise SystemExit(f"{args.host}: {code} {body}")
            record = webui.get("/optim/v1/status")["last_generations"][-1]
            record["wall_seconds"] = time.monotonic() - started
            return body, record

        def step_seconds(record: dict[str, Any]) -> float:
            its = record["telemetry"].get("it_per_s")
            return 1 / its if its else record["telemetry"]["seconds"] / args.steps

        parts = {p.strip() for p in args.parts.split(",") if p.strip()}
        eager_body, _ = generate({"enabled": True})  # loads the model; warm
        if "steps" in parts:
            first_body, first = generate({"compile": args.mode})
            compiled_first = first["telemetry"]["compile"]
            out["first_compile"] = {
                "compiles": compiled_first.get("compiles"),
                "graphs": compiled_first.get("graphs"),
                "compile_seconds": compiled_first.get("compile_seconds"),
                "blocks": compiled_first.get("blocks"),
                "fell_back": compiled_first.get("fell_back", False),
                "wall_seconds": first["wall_seconds"],
            }
            eager_steps, compiled_steps, compiled_walls = [], [], []
            for _ in range(args.rounds):
                _, record = generate({"enabled": True})
                eager_steps.append(step_seconds(record))
                _, record = generate({"compile": args.mode})
                compiled_steps.append(step_seconds(record))
                compiled_walls.append(record["wall_seconds"])
                assert record["telemetry"]["compile"].get("compiles") == 0, record["telemetry"]["compile"]
            out["step_seconds"] = {
                "eager": eager_steps,
                "compiled": compiled_steps,
                "eager_median": statistics.median(eager_steps),
                "compiled_median": statistics.median(compiled_steps),
                "speedup": statistics.median(eager_steps) / statistics.median(compiled_steps),
                "compiled_wall_median": statistics.median(compiled_walls),
            }
            out["max_pixel_diff"] = _max_diff(_image(first_body), _image(eager_body))

        _finish(webui, out, args, parts, generate, eager_body)
    finally:
        stop_webui(webui)
    return _write(out, args)


def _finish(
    webui: Any, out: dict[str, Any], args: argparse.Namespace, parts: set[str], generate: Any, eager_body: Any
) -> int:
    """Parts 2 and 3 (each first generation with compile on compiles, when part 1 did not run)."""
    if "alternating" in parts:
        # each block's first call in a generation runs eagerly (lib_optim.compile.regional): use 2+ steps here
        counts = []
        for size in (512, 576, 512, 576, 512, 576):
            _, record = generate({"compile": "on"}, size=size, steps=args.alt_steps)
            compiled = record["telemetry"]["compile"]
            counts.append({"size": size, "compiles": compiled.get("compiles"), "calls": compiled.get("calls")})
        out["alternating_sizes"] = counts
    if "lora" in parts:
        lora_prompt = f"a cat <lora:{LORA}:1>"
        eager_lora, _ = generate({"enabled": True}, prompt=lora_prompt)
        compiled_lora, record = generate({"compile": "on"}, prompt=lora_prompt)
        out["lora"] = {
            "max_pixel_diff_vs_eager": _max_diff(_image(compiled_lora), _image(eager_lora)),
            "lora_changes_image_by": _max_diff(_image(eager_lora), _image(eager_body)),
            "compiles": record["telemetry"]["compile"].get("compiles"),
        }
    out["totals"] = webui.get("/optim/v1/status")["compile"]
    return 0


def _write(out: dict[str, Any], args: argparse.Namespace) -> int:
    text = json.dumps(out, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
