"""``bench`` on tiny shapes: it runs, its JSON has the ratio fields, the guard skips what would not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from lib_optim.bench.attention import (
    MAX_ROUNDS,
    SLOW_CALL_S,
    STEP_LABEL,
    format_table,
    run_bench,
    timed_rounds,
    write_plot,
)
from lib_optim.cli import main


def test_cli_quick_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--json", "--shapes", "tiny", "--repeats", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "cpu" and data["repeats"] == 2
    rows = data["rows"]
    assert {r["backend"] for r in rows} >= {"sdp", "split", "sub-quad"}
    assert {r["kind"] for r in rows} == {"self", "cross"}
    for row in rows:
        assert row["ratio"] >= 1.0 and row["median_s"] > 0
        assert row["predicted_bytes"] > 0
        assert "error_pct" in row and "measured_bytes" in row
    assert min(r["ratio"] for r in rows if r["kind"] == "self") == 1.0
    assert [a["shape"] for a in data["auto"]] == [r["shape"] for r in rows if r["backend"] == "sdp"] + [STEP_LABEL]
    for auto in data["auto"]:
        assert auto["pick"] in {"sdp", "split", "sub-quad"} and auto["ratio"] >= 1.0
    # the step's ratio: the pick's summed time over the best backend's summed time
    sums = {b: sum(r["median_s"] for r in rows if r["backend"] == b) for b in ("sdp", "split", "sub-quad")}
    step = data["auto"][-1]
    assert step["ratio"] == pytest.approx(sums[step["pick"]] / min(sums.values()))
    assert "max_error_pct" in data and data["max_auto_ratio"] >= 1.0


def test_full_backend_set_and_table() -> None:
    result = run_bench(["tiny"], repeats=1)
    names = {r.backend for r in result.rows}
    assert {"none", "sdp-math"} <= names
    text = format_table(result)
    assert "Max planner error" in text and "auto" in text and "×best" in text


def test_guard_skips_what_would_not_fit() -> None:
    result = run_bench(["tiny"], quick=True, repeats=1, mem_fraction=1e-7)
    assert all(r.skipped and "limit" in r.skipped for r in result.rows)
    assert all(r.median_s is None for r in result.rows if r.skipped)
    assert "skipped" in format_table(result)
    # nothing ran: no backend has a time for the whole step, so no ratio
    assert result.auto[-1].shape == STEP_LABEL and result.auto[-1].ratio is None


def test_unknown_shape_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shapes", "sd15-1024"]) == 64
    assert "allowed: sd15-512, sd15-768, sdxl-1024" in capsys.readouterr().err


def test_plot_without_or_with_matplotlib(tmp_path: Path) -> None:
    result = run_bench(["tiny"], quick=True, repeats=1)
    target = tmp_path / "bench.png"
    message = write_plot(result, str(target))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in message and not target.exists()
    else:
        assert target.is_file()


def test_dtype_option_runs_the_2_byte_formulas_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--json", "--shapes", "tiny", "--repeats", "1", "--dtype", "bf16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dtype"] == "bfloat16"
    split = next(r for r in data["rows"] if r["backend"] == "split" and r["kind"] == "self")
    # 2-byte elements: the same call's prediction is half the fp32 one
    fp32 = run_bench(["tiny"], quick=True, repeats=1, backends=["split"])
    assert split["predicted_bytes"] * 2 == next(r.predicted_bytes for r in fp32.rows if r.kind == "self")
    with pytest.raises(ValueError, match=r"--dtype 'fp8' is not allowed; allowed: fp32, fp16, bf16"):
        run_bench(["tiny"], dtype="fp8")


class StepClock:
    """A clock that moves ``step`` seconds at each reading: every timed call takes exactly ``step``."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_fast_calls_get_more_rounds() -> None:
    """A sub-millisecond call is timed many times even with --repeats 1 (its median of one would be noise);
    the machine's real speed does not matter: the clock is injected."""
    result = run_bench(["tiny"], quick=True, repeats=1, clock=StepClock(0.001))
    timed = [r for r in result.rows if r.median_s is not None]
    assert timed and all(r.rounds == MAX_ROUNDS for r in timed)
    assert timed_rounds(1, [0.001, 0.002]) == MAX_ROUNDS
    assert timed_rounds(3, [0.05]) == 10  # as many as fit in FAST_ROUND_BUDGET_S (0.5 s)
    assert timed_rounds(3, [0.4]) == 3  # never fewer than asked


def test_slow_calls_count_their_warm_up_round() -> None:
    result = run_bench(["tiny"], quick=True, repeats=2, clock=StepClock(SLOW_CALL_S))
    timed = [r for r in result.rows if r.median_s is not None]
    assert timed and all(r.rounds == 2 and r.median_s == SLOW_CALL_S for r in timed)
