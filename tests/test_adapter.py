"""``lib_optim.hosts.base.auto_attention_request``: what ``auto`` is told about a generation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from lib_optim.hosts.base import auto_attention_request, hires_size  # noqa: E402


def p_of(**kwargs: object) -> SimpleNamespace:
    fields: dict[str, object] = {"width": 512, "height": 768, "batch_size": 1, "sd_model": SimpleNamespace()}
    fields.update(kwargs)
    return SimpleNamespace(**fields)


def test_no_devices_module_is_planned_as_the_cpu_in_fp32() -> None:
    request = auto_attention_request(p_of(), None, budget_mb=1024)
    assert (request["width"], request["height"], request["batch"], request["family"]) == (512, 768, 1, "sd15")
    assert (request["device"], request["dtype_bytes"]) == ("cpu", 4)
    assert request["budget_mb"] is None  # a budget is GPU memory: nothing to keep free on the CPU
    assert request["free_mb"] > 0


@pytest.mark.parametrize(
    ("scale", "resize", "expected"),
    [
        (1.5, (0, 0), (768, 1152)),  # hr_scale when no resize is given
        (1.5, (1024, 0), (1024, 1536)),  # one side given: the other keeps the aspect ratio
        (1.5, (0, 1024), (682, 1024)),
        (1.0, (1024, 1024), (1024, 1536)),  # both: scaled to cover 1024x1024, then cropped
        (1.0, (1024, 512), (1024, 1536)),
        (1.0, (256, 1024), (682, 1024)),
    ],
)
def test_the_hires_pass_sets_the_size(scale: float, resize: tuple[int, int], expected: tuple[int, int]) -> None:
    """As A1111 v1.10.1 calculate_target_resolution (processing.py:1223-1247) sizes a 512x768 first pass."""
    assert hires_size(512, 768, scale, *resize) == expected
    p = p_of(enable_hr=True, hr_scale=scale, hr_resize_x=resize[0], hr_resize_y=resize[1])
    request = auto_attention_request(p, None)
    assert (request["width"], request["height"]) == expected
    assert auto_attention_request(p_of(enable_hr=False, hr_scale=4.0), None)["width"] == 512


def test_gpu_device_dtype_model_family_and_budget() -> None:
    devices = SimpleNamespace(device=torch.device("cuda:0"), dtype_unet=torch.bfloat16)
    request = auto_attention_request(p_of(sd_model=SimpleNamespace(is_sdxl=True), batch_size=3), devices, budget_mb=512)
    assert (request["device"], request["dtype_bytes"], request["family"], request["batch"]) == ("cuda", 2, "sdxl", 3)
    assert request["budget_mb"] == 512
    if not torch.cuda.is_available():
        assert request["free_mb"] is None  # cannot be asked: planned without a free-memory limit


def test_gpu_only_fields_are_not_meaningful_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The UI hides, and the benchmark does not vary, what cannot change anything on a CPU-only host."""
    import sys
    import types

    from lib_optim.hosts.forge import ForgeAdapter

    adapter = ForgeAdapter(modules={})
    devices = types.ModuleType("modules.devices")
    monkeypatch.setitem(sys.modules, "modules.devices", devices)
    devices.device = torch.device("cpu")
    assert "inference_memory_mb" in adapter.supported_fields()  # still applied when asked (the API)
    # tiling lowers the process's peak on the CPU too
    assert adapter.meaningful_fields() == ("enabled", "attention", "channels_last", "compile", "vae_tiling")
    devices.device = torch.device("cuda", 0)
    assert adapter.meaningful_fields() == adapter.supported_fields()
