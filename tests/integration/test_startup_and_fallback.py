"""Start-up profile, telemetry and a real out-of-memory retry, in a real WebUI (see conftest.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import NO_HOST_REASON, configured_hosts, start_webui, stop_webui, torch_address_space

pytestmark = pytest.mark.host

# Every host has launch profiles (reForge its own, built from Forge previous's: lib_optim/launch/profiles.py)
PROFILE = {"a1111": "8gb-high", "forge": "8gb-low", "forge-previous": "8gb-low", "reforge": "8gb-low"}
NO_PROFILE = "no launch profile for this host (lib_optim/host_specs/known.py profiles_from)"


_NO_HOST = pytest.param(None, marks=pytest.mark.skip(reason=NO_HOST_REASON))


@pytest.fixture(scope="module", params=configured_hosts() or [_NO_HOST])
def profiled(request):
    profile = PROFILE.get(request.param)
    instance = start_webui(request.param, ["--optim-profile", profile] if profile else [])
    try:
        code, body = instance.txt2img()  # load the model
        assert code == 200, body
        yield instance
    finally:
        stop_webui(instance)


def _profile_generation(webui) -> dict[str, Any]:
    """The profile's per-generation values for this host, as the extension's own route reports them."""
    profiles = webui.get("/optim/v1/profiles")
    [profile] = [p for p in profiles if p["name"] == PROFILE[webui.host]]
    return profile["hosts"][webui.host]["generation"]


def test_startup_profile_is_applied(profiled):
    if profiled.host not in PROFILE:
        pytest.skip(NO_PROFILE)
    status = profiled.get("/optim/v1/status")
    assert status["startup_profile"] == PROFILE[profiled.host]
    log = profiled.log()
    assert f"[Optim] profile {PROFILE[profiled.host]} applied at start-up" in log
    if profiled.host == "a1111":
        # --opt-sdp-attention, injected as a parser default, makes A1111's "Automatic" pick sdp
        # (modules/sd_hijack.py:81) instead of InvokeAI, its choice on a CPU
        assert status["effective"]["attention"] == "sdp"
    elif profiled.host == "forge":
        assert status["effective"]["inference_memory_mb"] == 2048
        assert "python -m lib_optim profile apply 8gb-low" in log  # --attention-quad etc. need a restart
        assert status["effective"]["vae_device"] == "cpu"
    else:
        # Forge previous and reForge: attention is chosen when ldm_patched.ldm.modules.attention is imported, after
        # preload (docs/hosts.md §1.2, §3.5), so the profile's attention takes effect at start-up; its reserve
        # replaces minimum_inference_memory() (Forge previous: 1024 MB, §4.6; reForge: 0.8 GB + the OS reserve,
        # §4.7) when it has one
        generation = _profile_generation(profiled)
        assert "python -m lib_optim profile apply 8gb-low" in log  # its flags need a restart
        assert status["effective"]["vae_device"] == "cpu"
        if profiled.host == "forge-previous" or generation.get("inference_memory_mb"):
            assert status["effective"]["inference_memory_mb"] == (generation.get("inference_memory_mb") or 1024)
        backends = [b for b in status["attention_backends"] if b["host_name"] and b["attention"] != "host"]
        label = {b["host_name"]: b["attention"] for b in backends}
        assert label.get(status["effective"]["attention"]) == generation["attention"]


def test_profile_defaults_fill_the_accordion_fields(profiled):
    if profiled.host not in PROFILE:
        pytest.skip(NO_PROFILE)
    code, body = profiled.txt2img([{"channels_last": True}])
    assert code == 200, body
    text = json.loads(body["info"])["infotexts"][0]
    if profiled.host in ("forge-previous", "reforge"):
        expected = f"attention={_profile_generation(profiled)['attention']}"
    else:
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


# The hosts whose 'none' attention builds the full score matrix: A1111's (no optimization) and the ldm_patched
# hosts' attention_basic (docs/hosts.md §3.5, §3.6). Forge f2 has no 'none'. Per host: the address space the WebUI
# gets above what importing its torch maps (conftest.torch_address_space: a CUDA wheel maps gigabytes more than a
# CPU build) and the image side. 9.5 GiB: the WebUI runs, but 'none' attention at 640x640 needs two 2.6 GB score
# matrices at once and fails to allocate; sub-quadratic attention fits. reForge maps more while it loads a
# checkpoint (its VmPeak was 11.7 GB with a CPU torch, VmSize 6.1 GB after the load): 13.5 GiB, and at 768x768
# 'none' needs two 5.4 GB matrices.
FULL_MATRIX_HOSTS = {"a1111": (9.5, 640), "forge-previous": (9.5, 640), "reforge": (13.5, 768)}
_NO_FULL_MATRIX_HOST = pytest.param(
    None, marks=pytest.mark.skip(reason="needs OPTIM_A1111_DIR, OPTIM_FORGE_PREVIOUS_DIR or OPTIM_REFORGE_DIR")
)


@pytest.mark.parametrize("host", [h for h in configured_hosts() if h in FULL_MATRIX_HOSTS] or [_NO_FULL_MATRIX_HOST])
def test_real_out_of_memory_is_retried_once_with_frugal_settings(host):
    gib, side = FULL_MATRIX_HOSTS[host]
    webui = start_webui(host, address_space_limit=torch_address_space(host) + int(gib * 1024**3))
    try:
        assert webui.txt2img()[0] == 200  # load the model first
        before = webui.get("/optim/v1/status")["effective"]
        code, body = webui.txt2img([{"attention": "none"}], width=side, height=side, steps=1)
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
