"""``compile=auto`` in a real host (CPU, 64×64, 2 steps), in a WebUI with its own empty ``OPTIM_COMPILE_CACHE``.

1. One image with nothing measured and nothing compiled: ``auto`` runs it eagerly, from its estimates (a cold
   compile ≈ 120 s against the saving of 2 steps), and says so in the infotext.
2. This machine's 2 cores at 64×64 save too little per step for any job to pay for a cold compile, so the test
   files step figures of a machine where compiling pays (eager 5 s, compiled 1 s per step of one image) under the
   key the first generation reports (``compile.auto.key``) in the WebUI's ``compile-auto.json`` — the figures are
   injected, as a clock is; the host's job size, the key, the file, the decision and the compile are real:
   one image still runs eagerly (4 s × 2 steps < 120 s), 20 images (batch size 4 × batch count 5) compile
   (4 s × 40 steps > 120 s), and both decisions are in the infotext.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import NO_HOST_REASON, configured_hosts, start_webui, stop_webui

pytestmark = pytest.mark.host

SEED = 3
TIMEOUT = 2700  # a cold compile of the SD1.5 blocks on 2 busy cores (tests/integration/test_levers.py)
HOSTS = configured_hosts() or [pytest.param(None, marks=pytest.mark.skip(reason=NO_HOST_REASON))]
# per step of one image at the test's size, as lib_optim.compile.auto.AutoRecord files them
FIGURES = {"eager_step_s": 5.0, "eager_step_n": 1, "compiled_step_s": 1.0, "compiled_step_n": 1}


def auto_generation(webui: Any, **job: Any) -> tuple[dict[str, Any], str, int]:
    """A ``compile=auto`` generation: its compile telemetry, its first infotext and how many images came back."""
    code, body = webui.txt2img([{"compile": "auto"}], seed=SEED, **job)
    assert code == 200, body
    # a value with commas is quoted in the infotext (A1111 modules/infotext_utils.py:56-60, processing.py:812)
    infotext = str(json.loads(body["info"])["infotexts"][0]).replace('"', "")
    compiled = webui.get("/optim/v1/status")["last_generations"][-1]["telemetry"]["compile"]
    assert "auto" in compiled, compiled
    return compiled, infotext, len(body["images"])


def file_figures(memory: Path, key: str) -> None:
    """Put :data:`FIGURES` under ``key`` in the WebUI's ``compile-auto.json`` (read at every decision)."""
    data = json.loads(memory.read_text(encoding="utf-8")) if memory.is_file() else {"version": 1, "entries": {}}
    data["entries"][key] = {"figures": FIGURES}
    memory.parent.mkdir(parents=True, exist_ok=True)
    memory.write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.parametrize("host", HOSTS)
def test_auto_runs_one_cold_image_eagerly_and_compiles_a_twenty_image_job(host: str, tmp_path: Path):
    cache = tmp_path / "optim-compile"
    webui = start_webui(host, extra_env={"OPTIM_COMPILE_CACHE": str(cache)})
    webui.request_timeout = TIMEOUT
    try:
        code, body = webui.txt2img([{"enabled": True}], seed=SEED)  # loads the model
        assert code == 200, body

        cold, text, _ = auto_generation(webui)
        decision = cold["auto"]
        assert decision["compile"] is False and decision["cost"] == "cold" and not decision["cost_measured"], cold
        assert cold["compiles"] == 0 and "blocks" not in cold, cold  # nothing was compiled
        assert "Optim compile: auto→eager (compile ≈ 120 s cold, estimated; saves ≈" in text, text
        key = decision["key"]
        assert "|64px|" in key, key

        file_figures(cache / "compile-auto.json", key)
        one, text, _ = auto_generation(webui)
        assert one["auto"]["compile"] is False and one["auto"]["saving_measured"], one
        assert one["auto"]["key"] == key
        assert "auto→eager (compile ≈ 120 s cold, estimated; saves ≈ 4.00 s/step × 2 steps = 8 s, measured)" in text

        twenty, text, images = auto_generation(webui, batch_size=4, n_iter=5)
        assert images >= 20  # the grid, where the host returns it, comes first
        assert twenty["auto"]["compile"] is True and twenty["auto"]["images"] == 20, twenty
        assert not twenty.get("fell_back") and twenty["blocks"] > 0 and twenty["compiles"] > 0, twenty
        assert (
            "auto→compile (compile ≈ 120 s cold, estimated; saves ≈ 4.00 s/step × 40 steps (20 images) = 160 s, "
            "measured)" in text
        ), text
    finally:
        stop_webui(webui)
