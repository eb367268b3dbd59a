"""Start-up profile, telemetry and a real out-of-memory retry, in a real WebUI (see conftest.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import configured_hosts, start_webui, stop_webui

pytestmark = pytest.mark.host

PROFILE = {"a1111": "8gb-high", "forge": "8gb-low"}


_NO_HOST = pytest.param(None, marks=pytest.mark.skip(reason="set OPTIM_A1111_DIR or OPTIM_FORGE_DIR"))


@pytest.fixture(scope="module", params=configured_hosts() or [_NO_HOST])
def profiled(request):
    instance = start_webui(request.param, ["--optim-profile", PROFILE[request.param]])
    try:
        code, body = instance.txt2img()  # load the model
        assert code == 200, body
        yield instance
    finally:
        stop_webui(instance)


def test_startup_profile_is_applied(profiled):
    status = profiled.get("/optim/v1/status")
    assert status["startup_profile"] == PROFILE[profiled.host]
    log = profiled.log()
    assert f"[Optim] profile {PROFILE[profiled.host]} applied at start-up" in log
    if profiled.host == "a1111":
        # --opt-sdp-attention, injected as a parser default, makes A1111's "Automatic" pick sdp
        # (modules/sd_hijack.py:81) instead of InvokeAI, its choice on a CPU
        assert status["effective"]["attention"] == "sdp"
    else:
        assert status["effective"]["inference_memory_mb"] == 2048
        assert "python -m lib_optim profile apply 8gb-low" in log  # --attention-quad etc. need a restart
        assert status["effective"]["vae_device"] == "cpu"


def test_profile_defaults_fill_the_accordion_fields(profiled):
    code, body = profiled.txt2img([{"channels_last": True}])
    assert code == 200, body
    text = json.loads(body["info"])["infotexts"][0]
    expected = "attention=sdp" if profiled.host == "a1111" else "attention=sub-quad"
    assert expected in text


def test_telemetry_in_status_and_infotext(profiled):
    code, _ = profiled.request("POST", "/sdapi/v1/options", {"optim_telemetry_infotext": True})
    assert code == 200
    try:
        code, body = profiled.txt2img([{"enabled": True}], steps=3)
        assert code == 200, body
        text = json.loads(body["info"])["infotexts"][0]
        assert "Optim telemetry:" in text and "it/s" in text
    finally:
        profiled.request("POST", "/sdapi/v1/options", {"optim_telemetry_infotext": False})
    record: dict[str, Any] = profiled.get("/optim/v1/status")["last_generations"][-1]
    telemetry = record["telemetry"]
    assert telemetry["steps"] == 3 and telemetry["it_per_s"] > 0
    assert telemetry["process_peak_rss_mb"] > telemetry["process_start_rss_mb"] > 0
    assert record["telemetry_text"]


def test_real_out_of_memory_is_retried_once_with_frugal_settings():
    if "a1111" not in configured_hosts():
        pytest.skip("needs OPTIM_A1111_DIR: A1111's 'none' attention builds the full score matrix")
    # 10 GiB of address space: the WebUI runs, but 'none' attention at 640x640 needs two 2.6 GB score
    # matrices at once and fails to allocate; sub-quadratic attention fits.
    webui = start_webui("a1111", address_space_limit=10 * 1024**3)
    try:
        assert webui.txt2img()[0] == 200  # load the model first
        before = webui.get("/optim/v1/status")["effective"]
        code, body = webui.txt2img([{"attention": "none"}], width=640, height=640, steps=1)
        assert code == 200, body
        text = json.loads(body["info"])["infotexts"][0]
        assert "Optim fallback:" in text and "retried after out of memory" in text
        assert "attention=sub-quad" in text
        status = webui.get("/optim/v1/status")
        first, second = status["last_generations"][-2:]
        assert first["settings"] == {"attention": "none"} and first["fallback"] and first["restored"]
        assert second["settings"]["attention"] == "sub-quad" and second["restored"]
        assert status["effective"] == before
        assert "[Optim] out of memory" in webui.log()
    finally:
        stop_webui(webui)
