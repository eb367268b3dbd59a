"""lib_optim.bench.vae: the side-by-side VAE decode benchmark, and the memory model against one real peak."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lib_optim.bench import vae as vae_bench
from lib_optim.vae import planner as vae_planner


def fake_measure(peaks: dict[str, int], fail: set[str] = frozenset()):
    specs: list[dict] = []

    def measure(spec):
        specs.append(spec)
        name = spec["variant"]
        if name in fail:
            raise RuntimeError("[Optim] vae bench: the measuring process failed (-9): killed")
        Path(spec["save"]).write_text(name, encoding="utf-8")
        return {"peak_bytes": peaks[name], "seconds": 2.0, "method": "fake meter", "image": spec["save"]}

    return measure, specs


IMAGES = {
    "untiled": torch.zeros(1, 3, 8, 8),
    "module": torch.full((1, 3, 8, 8), 0.01),
    "callable": torch.ones(1, 3, 8, 8),
}


def load(path: str) -> torch.Tensor:
    return IMAGES[Path(path).read_text(encoding="utf-8")]


def test_rows_side_by_side_with_prediction_error_and_psnr():
    predicted = vae_planner.predict_decode_peak_bytes(1024, 1024, dtype_bytes=4, device="cpu")
    module_predicted = vae_planner.predict_tiled_peak_bytes(
        1024, 1024, tile=64, overlap=16, dtype_bytes=4, device="cpu"
    )
    measure, specs = fake_measure({"untiled": predicted // 2, "module": module_predicted, "callable": 200 << 20})
    result = vae_bench.run_vae_bench(
        (1024,), variants=("module", "callable"), free_bytes=64 << 30, measure=measure, load_image=load
    )
    assert [r.variant for r in result.rows] == ["untiled", "module/exact", "callable"]
    untiled, module, callable_ = result.rows
    assert untiled.predicted_bytes == predicted and untiled.error_pct == pytest.approx(100.0)
    assert module.psnr_db == pytest.approx(10 * math.log10(4 / 0.01**2))
    assert callable_.psnr_db == pytest.approx(10 * math.log10(4 / 1.0))
    assert (module.tile, module.overlap, callable_.overlap) == (64, 16, 16)
    assert [s["variant"] for s in specs] == ["untiled", "module", "callable"]
    assert all(s["dtype"] == "fp32" and s["device"] == "cpu" and s["size"] == 1024 for s in specs)
    assert module.error_pct == 0.0
    assert result.memory_method == "fake meter"
    assert result.max_error_pct == max(abs(r.error_pct) for r in result.rows) > 100


def test_a_run_predicted_not_to_fit_is_skipped_and_a_failed_one_reported():
    measure, specs = fake_measure({"module": 50 << 20}, fail={"callable"})
    limit = vae_planner.predict_decode_peak_bytes(2048, 2048, dtype_bytes=4, device="cpu") - 1
    result = vae_bench.run_vae_bench(
        (2048,), variants=("module", "callable"), free_bytes=limit, mem_fraction=1.0, measure=measure, load_image=load
    )
    untiled, module, callable_ = result.rows
    assert untiled.skipped.startswith("predicted ") and untiled.measured_bytes is None
    assert module.measured_bytes == 50 << 20 and module.psnr_db is None  # nothing to compare with
    assert callable_.skipped == "failed: [Optim] vae bench: the measuring process failed (-9): killed"
    assert [s["variant"] for s in specs] == ["module", "callable"]
    table = vae_bench.format_vae_table(result)
    assert "skipped: predicted" in table and "module/exact" in table and "PSNR target" in table


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "fp8"}, "dtype: 'fp8' is not allowed"),
        ({"variants": ("lowres",)}, "variant: 'lowres' is not allowed; allowed: module, callable"),
        ({"sizes": (1001,)}, "size: 1001 is not allowed"),
        ({"mem_fraction": 0}, "mem_fraction: 0 is not allowed"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vae_bench.run_vae_bench(**{"sizes": (512,), **kwargs}, measure=lambda spec: {})


def test_memory_model_matches_a_measured_decode():
    """One real reading in a fresh process (the benchmark's method): a 256² decode with the 1/4-width VAE."""
    got = vae_bench.measure_in_subprocess({"size": 256, "scale": 0.25, "variant": "untiled", "dtype": "fp32"})
    if not got["peak_bytes"]:
        pytest.skip(f"peak memory not measurable here ({got['method']})")
    predicted = vae_planner.predict_decode_peak_bytes(256, 256, dtype_bytes=4, channels=32, device="cpu")
    assert abs(predicted - got["peak_bytes"]) <= 0.15 * got["peak_bytes"]
