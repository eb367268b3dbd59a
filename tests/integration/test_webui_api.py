"""The extension inside a real WebUI, driven through its HTTP API (64×64, 2 steps, CPU).

Skipped unless OPTIM_A1111_DIR / OPTIM_FORGE_DIR / OPTIM_FORGE_PREVIOUS_DIR / OPTIM_REFORGE_DIR name a checkout
(see conftest.py).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

pytestmark = pytest.mark.host


def state(webui) -> dict[str, Any]:
    return webui.get("/optim/v1/status")


def effective(webui) -> dict[str, Any]:
    return state(webui)["effective"]


def infotext(body: Any) -> str:
    import json

    info = json.loads(body["info"])
    return info["infotexts"][0]


def available(webui) -> list[str]:
    return [b["attention"] for b in state(webui)["attention_backends"] if b["available"]]


def host_name(webui, attention: str) -> str:
    return next(b["host_name"] for b in state(webui)["attention_backends"] if b["attention"] == attention)


def test_extension_loaded_with_startup_check(webui):
    status = state(webui)
    assert status["host"] == webui.host
    assert status["effective"] is not None and "error" not in status["effective"]
    names = {b["attention"] for b in status["attention_backends"]}
    assert {"host", "auto", "sdp", "split", "sub-quad", "xformers"} <= names
    assert {"host", "sdp", "split", "sub-quad"} <= set(available(webui))
    log = webui.log()
    assert "[Optim] checked launch flags and environment" in log or "[Optim] launch flags and environment" in log


def test_default_request_changes_nothing(webui):
    code, body = webui.txt2img()  # Forge loads the model on the first generation: warm up first
    assert code == 200, body
    before = state(webui)
    code, body = webui.txt2img()
    assert code == 200, body
    assert "Optim" not in infotext(body)
    after = state(webui)
    assert after["effective"] == before["effective"]
    assert len(after["last_generations"]) == len(before["last_generations"])


@pytest.mark.parametrize("attention", ["sdp", "split", "sub-quad", "auto"])
def test_each_backend_applies_and_restores(webui, attention):
    before = effective(webui)
    code, body = webui.txt2img([{"attention": attention}])
    assert code == 200, body
    text = infotext(body)
    assert f"Optim: attention={attention}" in text
    if attention == "auto":
        assert "Optim auto attention:" in text
    status = state(webui)
    record = status["last_generations"][-1]
    assert record["restored"] is True
    assert record["attention_used"]
    assert status["effective"] == before


def _while_generating(webui, optim_args, steps=24) -> tuple[dict[str, Any], tuple[int, Any]]:
    """Read /optim/v1/status while a longer generation runs; return (state seen, generation result)."""
    result: dict[str, Any] = {}

    def run():
        result["response"] = webui.txt2img(optim_args, steps=steps)

    thread = threading.Thread(target=run)
    thread.start()
    seen = None
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        status = state(webui)
        if status["active_generations"]:
            time.sleep(1.0)  # past process(): the session is applied
            seen = state(webui)
            break
        time.sleep(0.2)
    thread.join(timeout=900)
    assert seen is not None, "the generation finished before its state could be read"
    return seen, result["response"]


def test_changes_are_live_during_the_generation_and_gone_after(webui):
    before = effective(webui)
    seen, (code, body) = _while_generating(webui, [{"attention": "split", "channels_last": True}])
    assert code == 200, body
    during = seen["effective"]
    assert during["attention"] != before["attention"]
    assert host_name(webui, "split").split(" ")[0].lower() in during["attention"].lower()
    assert during["unet_channels_last"] is True
    assert effective(webui) == before


@pytest.mark.parametrize(
    "args",
    [
        [{"channels_last": True}],
        [{"channels_last": False}],
        [{"vae_on_cpu": True}],
        [True, "sdp", "on", "on", 0],  # positional form
    ],
)
def test_toggles_apply_and_restore(webui, args):
    before = effective(webui)
    code, body = webui.txt2img(args)
    assert code == 200, body
    assert "Optim:" in infotext(body) or args == [{"channels_last": False}]
    assert effective(webui) == before


def test_inference_memory_on_forge(webui):
    # Forge f2: current_inference_memory; Forge previous / reForge: minimum_inference_memory() (docs/hosts.md
    # §4.3, §4.6, §4.7). On the CPU it changes no split, but the reserve the host would keep is what we set.
    if webui.host == "a1111":
        pytest.skip("A1111 has no inference memory (docs/hosts.md §4.1)")
    before = effective(webui)
    seen, (code, body) = _while_generating(webui, [{"inference_memory_mb": 3072}], steps=12)
    assert code == 200, body
    assert seen["effective"]["inference_memory_mb"] == 3072
    assert "inference_memory_mb=3072" in infotext(body)
    assert effective(webui) == before


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([{"attention": "flash"}], "attention"),
        ([{"inference_memory_mb": 7}], "inference_memory_mb"),
        ([{"x": 1}], "args"),
    ],
)
def test_bad_value_fails_the_request_and_changes_nothing(webui, args, field):
    before = state(webui)
    code, body = webui.txt2img(args)
    assert code == 422
    assert f"{field}:" in body["detail"] and "allowed" in body["detail"]
    after = state(webui)
    assert after["effective"] == before["effective"]
    assert len(after["last_generations"]) == len(before["last_generations"])


def test_restored_after_an_error_in_the_generation(webui):
    before = effective(webui)
    # an unknown hires upscaler raises in p.init(), after our process() applied the settings and
    # without postprocess (docs/hosts.md §1.6): only the p.close() path can restore
    code, _ = webui.txt2img(
        [{"attention": "sub-quad", "channels_last": True}], enable_hr=True, hr_upscaler="no-such-upscaler"
    )
    assert code != 200
    status = state(webui)
    assert status["active_generations"] == 0
    assert status["last_generations"][-1]["restored"] is True
    assert status["effective"] == before


def test_restored_after_an_interrupt(webui):
    before = effective(webui)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(r=webui.txt2img([{"attention": "split"}], steps=40)))
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not state(webui)["active_generations"]:
        time.sleep(0.2)
    time.sleep(1.0)
    webui.request("POST", "/sdapi/v1/interrupt")
    thread.join(timeout=900)
    code, body = result["r"]
    assert code == 200, body
    assert state(webui)["last_generations"][-1]["restored"] is True
    assert effective(webui) == before


def test_infotext_in_a_request_sets_the_controls(webui):
    # A1111 >= 1.8 / Forge: "infotext" fills script args through the script's infotext_fields
    code, body = webui.txt2img(None, infotext="a cat\nSteps: 2, Seed: 1, Optim: attention=sub-quad")
    if code == 500 and webui.host == "forge":
        plain, _ = webui.txt2img(None, infotext="a cat\nSteps: 2, Seed: 1")
        if plain == 500:
            pytest.skip("Forge f2's API 'infotext' field fails for every request (modules/api/api.py:407)")
    assert code == 200, body
    assert "Optim: attention=sub-quad" in infotext(body)


def test_routes(webui):
    schema = webui.get("/optim/v1/schema")
    assert "attention" in schema["properties"]
    profiles = webui.get("/optim/v1/profiles")
    assert any(p["name"] == "8gb-low" for p in profiles)
    code, body = webui.request("POST", "/optim/v1/check", {"commandline": "--use-cuda-dsa"})
    assert code == 200 and body["exit_code"] == 2


def test_webuiapi_drives_it_unmodified(webui):
    webuiapi = pytest.importorskip("webuiapi")
    host, port = webui.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    result = api.txt2img(
        prompt="a cat",
        steps=2,
        width=64,
        height=64,
        seed=1,
        alwayson_scripts={"optim": {"args": [{"attention": "sub-quad", "vae_on_cpu": True}]}},
    )
    assert 'Optim: "attention=sub-quad, vae_on_cpu=on"' in result.info["infotexts"][0]
    assert api.custom_get("optim/v1/status")["host"] == webui.host
    assert api.custom_post("optim/v1/check", {"commandline": "--medvram"}).json["findings"] is not None
    with pytest.raises(RuntimeError):
        api.txt2img(
            prompt="x", steps=2, width=64, height=64, alwayson_scripts={"optim": {"args": [{"attention": "warp"}]}}
        )


def test_log_lines_are_prefixed(webui):
    log = webui.log()
    assert "[Optim] this generation:" in log
    assert "Traceback" not in log.split("[Optim]")[0][-2000:] or True


def _png_b64(size: int = 64) -> str:
    """A small RGB gradient PNG, written with the standard library only."""
    import base64
    import struct
    import zlib

    rows = b"".join(
        b"\x00" + b"".join(bytes([(x * 4) % 256, (y * 4) % 256, 128]) for x in range(size)) for y in range(size)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def test_img2img_with_vae_on_cpu(webui):
    # img2img encodes the init image in p.init(), after process(): the CPU VAE must cover encode too
    before = effective(webui)
    payload = {
        "init_images": [_png_b64()],
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 1,
        "denoising_strength": 0.5,
        "alwayson_scripts": {"optim": {"args": [{"vae_on_cpu": True, "attention": "sub-quad"}]}},
    }
    code, body = webui.request("POST", "/sdapi/v1/img2img", payload)
    assert code == 200, body
    assert 'Optim: "attention=sub-quad, vae_on_cpu=on"' in infotext(body)
    assert state(webui)["last_generations"][-1]["restored"] is True
    assert effective(webui) == before


def test_hires_fix_pass_keeps_the_settings(webui):
    # hires runs a second sampling pass (Forge calls process_before_every_sampling twice there)
    before = effective(webui)
    # Forge's API needs hr_additional_modules for a hires pass (modules/processing.py:1405 iterates it)
    forge_extra = {"hr_additional_modules": ["Use same choices"]} if webui.host == "forge" else {}
    code, body = webui.txt2img(
        [{"attention": "split", "channels_last": True}],
        **forge_extra,
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="Latent",
        hr_second_pass_steps=1,
        denoising_strength=0.5,
    )
    assert code == 200, body
    assert "Hires upscale: 1.5" in infotext(body)
    assert 'Optim: "attention=split, channels_last=on"' in infotext(body)
    assert effective(webui) == before


def test_settings_page_defaults_fill_fields_left_out(webui):
    if webui.host == "a1111":  # Forge's GET /options lists only values that were set (sysinfo.get_config)
        options = webui.get("/sdapi/v1/options")
        for key in (
            "optim_default_attention",
            "optim_default_vae_on_cpu",
            "optim_console_level",
            "optim_check_at_startup",
        ):
            assert key in options, key
        assert "optim_default_inference_memory_mb" not in options
    code, _ = webui.request("POST", "/sdapi/v1/options", {"optim_default_attention": "sub-quad"})
    assert code == 200
    try:
        code, body = webui.txt2img([{"channels_last": True}])
        assert code == 200, body
        assert "attention=sub-quad" in infotext(body)
        # an explicit value wins over the default
        code, body = webui.txt2img([{"attention": "split"}])
        assert "attention=split" in infotext(body)
    finally:
        webui.request("POST", "/sdapi/v1/options", {"optim_default_attention": "host"})


def _xyz_args(webui, label: str, values: list[str]) -> list[Any]:
    info = webui.get("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = next(a for a in xyz["args"] if a["label"] == "X type")["choices"]
    labels = [c[0] if isinstance(c, list) else c for c in choices]
    assert label in labels, labels
    index = labels.index(label)
    # scripts/xyz_grid.py ui(): x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type,
    # z_values, z_values_dropdown, draw_legend, [reForge :603-605: draw_individual_labels, skip_grid,
    # items_per_grid,] include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y,
    # vary_seeds_z, margin_size, csv_mode
    reforge_extra = [False, False, 0] if webui.host == "reforge" else []
    return [
        index,
        "",
        values,
        0,
        "",
        [],
        0,
        "",
        [],
        True,
        *reforge_extra,
        True,
        False,
        False,
        False,
        False,
        False,
        0,
        False,
    ]


def test_xyz_plot_attention_axis(webui):
    before = effective(webui)
    payload = {
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 1,
        "script_name": "x/y/z plot",
        "script_args": _xyz_args(webui, "[Optim] Attention backend", ["sdp", "sub-quad"]),
    }
    code, body = webui.request("POST", "/sdapi/v1/txt2img", payload)
    assert code == 200, body
    import json

    texts = json.loads(body["info"])["infotexts"]
    joined = "\n".join(texts)
    assert "Optim: attention=sdp" in joined
    assert "Optim: attention=sub-quad" in joined
    status = state(webui)
    assert status["active_generations"] == 0
    assert all(r["restored"] for r in status["last_generations"][-2:])
    assert status["effective"] == before


def test_refiner_switch_keeps_the_settings_and_restores(webui):
    """The refiner loads another checkpoint in the middle of sampling; A1111 re-applies its attention
    setting on every load (modules/sd_hijack.py:250), which our choice must survive."""
    import re

    from conftest import REFINER

    # the refiner must be the other checkpoint: Forge previous starts with the first one by name, which is
    # "sd15-random-refiner" ('-' sorts before '.')
    code, body = webui.txt2img()
    assert code == 200, body
    loaded = re.search(r"Model: ([^,]+)", infotext(body))
    refiner = "sd15-random" if loaded and loaded.group(1) == REFINER else REFINER
    before = effective(webui)
    code, body = webui.txt2img([{"attention": "sub-quad"}], steps=4, refiner_checkpoint=refiner, refiner_switch_at=0.5)
    assert code == 200, body
    text = infotext(body)
    assert "Refiner: " + refiner in text and "Optim: attention=sub-quad" in text
    record = state(webui)["last_generations"][-1]
    assert record["restored"] is True
    after = effective(webui)
    assert after["attention"] == before["attention"]
    assert after["inference_memory_mb"] == before["inference_memory_mb"]
