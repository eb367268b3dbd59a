"""The compile benchmark's loop and table (the compiled timing itself is exercised by test_regional_compile)."""

from __future__ import annotations

import pytest

from lib_optim.bench import compile as cb


class StepClock:
    """Advances 10 ms per reading: every timed call measures 10 ms."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def test_sd15_like_unet_has_sd15_block_layout():
    unet = cb.sd15_like_unet(model_channels=8, context_dim=8, heads=2)
    names = [type(m).__name__ for m in unet.modules()]
    assert names.count("ResBlock") == 22 and names.count("SpatialTransformer") == 16  # as in SD1.5
    assert len(unet.input_blocks) == 12 and len(unet.output_blocks) == 12


def test_bench_loop_and_table_with_compile_off():
    result = cb.run_compile_bench(latent=(8, 8), batch=1, model_channels=8, rounds=2, mode="off", clock=StepClock())
    assert result.blocks == 38 and result.compiles == 0 and result.recompiles_while_timing == 0
    assert len(result.eager_samples) == len(result.compiled_samples) == 2
    assert result.eager_s == pytest.approx(0.01) and result.speedup == pytest.approx(1.0)
    assert result.max_abs_diff == 0.0
    table = cb.format_compile_table([result, result])
    lines = table.splitlines()
    assert len(lines) == 4 and "speedup" in lines[0] and set(lines[1]) <= {"-", " "}
    assert "8x8" in lines[2] and "1.00x" in lines[2] and "10.0" in lines[2]
    assert result.to_dict()["speedup"] == pytest.approx(1.0)


def test_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounds=0"):
        cb.run_compile_bench(rounds=0)
    with pytest.raises(ValueError, match="latent=\\(4, 4\\)"):
        cb.run_compile_bench(latent=(4, 4))
