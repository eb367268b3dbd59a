"""The two big levers in the real hosts, through the API (64×64, CPU): regional torch.compile and tiled VAE.

Compiling on a 2-core CPU takes minutes the first time in a process (torch's on-disk cache makes later processes
faster); the tests are ordered so each host compiles its blocks once.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import Any

import pytest
from conftest import LORA

pytestmark = pytest.mark.host

SEED = 3
LORA_PROMPT = f"a cat <lora:{LORA}:1>"


def image(body: Any) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")


def max_pixel_diff(a: Any, b: Any) -> int:
    from PIL import ImageChops

    extrema = ImageChops.difference(a, b).getextrema()
    return max(high for _, high in extrema)


def infotext(body: Any) -> str:
    return str(json.loads(body["info"])["infotexts"][0])


def last(webui) -> dict[str, Any]:
    return webui.get("/optim/v1/status")["last_generations"][-1]


# A cold first compile of SD1.5's blocks (and the VAE's) on torch 2.1 took 17 min on this suite's 2 busy cores;
# the compile cache kept across restarts makes the next run's far shorter.
COMPILE_TIMEOUT = 2700


def generate(webui, settings: dict[str, Any] | None, prompt: str = "a cat", **extra: Any) -> Any:
    webui.request_timeout = max(webui.request_timeout, COMPILE_TIMEOUT)
    code, body = webui.txt2img([settings] if settings is not None else None, prompt=prompt, seed=SEED, **extra)
    assert code == 200, body
    return body


def test_interrupt_during_a_first_compile_is_answered_between_blocks(webui):
    """Interrupt pressed while the blocks compile for the first time: answered within 60 s (the host itself checks
    once per step, and a first compile takes minutes within one step), nothing is left patched, and the next eager
    image is the one before."""
    eager = image(generate(webui, {"enabled": True}))
    done: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: done.update(body=webui.txt2img([{"compile": "on"}], seed=SEED)))
    worker.start()
    deadline = time.monotonic() + 600
    while "compiling the UNet blocks" not in webui.log() and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.5)
    assert worker.is_alive(), "the generation ended before its compile started"
    time.sleep(8)
    pressed = time.monotonic()
    assert webui.request("POST", "/sdapi/v1/interrupt")[0] == 200
    worker.join(timeout=120)
    answered = time.monotonic() - pressed
    assert not worker.is_alive() and answered <= 60, f"Interrupt answered after {answered:.0f} s"
    record = last(webui)
    assert record["restored"], record
    after = image(generate(webui, {"enabled": True}))
    assert max_pixel_diff(after, eager) == 0


def test_compile_once_then_reuse_exact_restore_and_lora(webui):
    """Compiled images equal eager ones (float tolerance); a second generation reuses the compiled code; a LoRA
    applied after the compile is honoured (no stale weights baked into a graph) and removed again; and
    afterwards an eager generation is exactly what it was before."""
    eager = image(generate(webui, {"enabled": True}))
    eager_lora = image(generate(webui, {"enabled": True}, prompt=LORA_PROMPT))
    assert max_pixel_diff(eager, eager_lora) > 8, "the test LoRA must change the image, or this test proves nothing"

    first = generate(webui, {"compile": "on"})
    record = last(webui)
    compiled = record["telemetry"]["compile"]
    assert not compiled.get("fell_back"), compiled
    assert compiled["compiles"] >= 1 and compiled["blocks"] > 0, compiled
    # one graph per block, nothing outside our regions: no graph break in any block on the host's own torch
    assert compiled["graph_breaks"] == 0 and compiled["graphs"] <= compiled["blocks"], compiled
    if webui.host != "reforge":  # torch < 2.5 (reForge pins 2.9, where dynamo shares graphs itself)
        assert compiled["shared_graphs"] > 0, compiled  # identical blocks compiled once
    assert "Optim compile: compiled:" in infotext(first) or 'Optim compile: "compiled:' in infotext(first)
    assert max_pixel_diff(image(first), eager) <= 2

    second = generate(webui, {"compile": "on"})
    again = last(webui)["telemetry"]["compile"]
    assert again["compiles"] == 0, again  # same model, attention and dtype: nothing compiles again
    assert again["eager_calls"] == 0, again  # weights unchanged: no block runs its first call eagerly
    assert "compiled (reused)" in infotext(second)
    assert max_pixel_diff(image(second), eager) <= 2

    with_lora = generate(webui, {"compile": "on"}, prompt=LORA_PROMPT)
    assert max_pixel_diff(image(with_lora), eager_lora) <= 2  # the LoRA's weights, not the compiled ones
    without = generate(webui, {"compile": "on"})
    assert max_pixel_diff(image(without), eager) <= 2  # and gone again

    after = image(generate(webui, {"enabled": True}))
    assert max_pixel_diff(after, eager) == 0  # nothing of the compile is left in the eager model
    totals = webui.get("/optim/v1/status")["compile"]
    assert totals is not None and totals["total_compiles"] >= compiled["compiles"]


def test_compile_with_every_attention_backend_compiles_each_variant_once(webui):
    """Every attention backend the host offers here (CPU: all but the CUDA-only ones) compiles with no fallback and
    no graph break, and a second generation with it compiles nothing. One report for all backends."""
    backends = [
        b["attention"]
        for b in webui.get("/optim/v1/status")["attention_backends"]
        if b["available"] and b["attention"] != "auto"
    ]
    assert backends, "the host offers no attention backend"
    problems: dict[str, Any] = {}
    for attention in backends:
        generate(webui, {"compile": "on", "attention": attention})
        first = last(webui)["telemetry"]["compile"]
        generate(webui, {"compile": "on", "attention": attention})
        second = last(webui)["telemetry"]["compile"]
        if first.get("fell_back") or second.get("fell_back") or first["graph_breaks"] or second["compiles"]:
            keys = ("compiles", "graph_breaks", "fell_back", "fallback_reason", "recompile_reasons")
            problems[attention] = {
                "first": {k: first.get(k) for k in keys},
                "second": {k: second.get(k) for k in keys},
            }
    assert not problems, json.dumps(problems, indent=1)
