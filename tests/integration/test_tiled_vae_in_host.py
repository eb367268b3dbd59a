"""Tiled VAE in the real hosts, through the API (CPU, random-weight SD1.5 at 320×320, 2 steps).

The WebUI starts with ``OPTIM_VAE_MAX_TILE=32`` (latent pixels), so a 320×320 image (40×40 latent) is decoded and
encoded in 2×2 tiles even with the machine's plenty of free memory; ``auto`` still decodes it whole, since the
whole image fits.
"""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import pytest
from conftest import WebUI

pytestmark = pytest.mark.host

SIZE = 320
TILE = 32


WEBUI_ENV = {"OPTIM_VAE_MAX_TILE": str(TILE)}  # read by conftest's webui fixture


def image(body: Any) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")


def psnr(a: Any, b: Any) -> float:
    from PIL import ImageChops, ImageStat

    diff = ImageChops.difference(a, b)
    mse = sum(v**2 for v in ImageStat.Stat(diff).rms) / 3
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def infotext(body: Any) -> str:
    return str(json.loads(body["info"])["infotexts"][0])


def generate(webui: WebUI, settings: dict[str, Any]) -> Any:
    code, body = webui.txt2img([settings], width=SIZE, height=SIZE, seed=5)
    assert code == 200, body
    return body


def last(webui: WebUI) -> dict[str, Any]:
    return webui.get("/optim/v1/status")["last_generations"][-1]


def test_tiled_decode_has_no_seams_auto_decides_and_everything_is_restored(webui):
    whole = generate(webui, {"vae_tiling": "off"})
    tiled = generate(webui, {"vae_tiling": "on"})
    record = last(webui)
    events = record["telemetry"]["vae_tiling"]["events"]
    assert [(e["kind"], e["tiled"]) for e in events] == [("decode", True)], events
    tile = events[0]["tile"]
    assert tile <= TILE < SIZE // 8, events  # more than one tile a side (shrunk to the fewest pixels that need no more)
    assert record["restored"] is True
    assert f"Optim VAE tiling: decode {SIZE}x{SIZE} tiled (tiles of {tile})" in infotext(tiled).replace('"', "")
    quality = psnr(image(tiled), image(whole))
    assert quality >= 40, quality  # no visible seams

    auto = generate(webui, {"vae_tiling": "auto"})
    (event,) = last(webui)["telemetry"]["vae_tiling"]["events"]
    assert event["tiled"] is False and "fits in" in event["reason"], event
    assert f"decode {SIZE}x{SIZE} untiled" in infotext(auto)
    assert psnr(image(auto), image(whole)) == math.inf

    again = generate(webui, {"enabled": True})
    assert psnr(image(again), image(whole)) == math.inf  # nothing of the tiling is left


def test_img2img_encode_is_tiled_too(webui):
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (SIZE, SIZE), (90, 140, 200)).save(buffer, format="PNG")
    payload = {
        "init_images": [base64.b64encode(buffer.getvalue()).decode()],
        "prompt": "a cat",
        "steps": 2,
        "width": SIZE,
        "height": SIZE,
        "seed": 1,
        "denoising_strength": 0.5,
        "alwayson_scripts": {"optim": {"args": [{"vae_tiling": "on"}]}},
    }
    code, body = webui.request("POST", "/sdapi/v1/img2img", payload)
    assert code == 200, body
    events = last(webui)["telemetry"]["vae_tiling"]["events"]
    kinds = [(e["kind"], e["tiled"]) for e in events]
    assert ("encode", True) in kinds and ("decode", True) in kinds, events
    assert 'Optim: "vae_tiling=on"' in infotext(body) or "Optim: vae_tiling=on" in infotext(body)


def test_a_bad_value_names_the_field(webui):
    code, body = webui.txt2img([{"vae_tiling": "sometimes"}])
    assert code == 422, body
    assert "vae_tiling" in str(body) and "sometimes" in str(body) and "auto" in str(body)
