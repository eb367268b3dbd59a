"""The GPU report (issue 16 §5): the matrix, its budget against an injected clock, the cold/warm compile caches,
the JSON and markdown, the command line and tools/measure_gpu.sh. Quick CPU mode; no GPU needed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lib_optim import cli
from lib_optim.attention import impl
from lib_optim.bench import cold_warm
from lib_optim.bench import compile as cb
from lib_optim.bench import gpu_report as gr
from lib_optim.bench.attention import host_backends, run_bench, target_labels
from lib_optim.bench.gpu_table import format_markdown

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


class FakeClock:
    """Seconds that pass only when a fake reading says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def compile_row(spec: dict[str, Any], eager_ms: float = 30.0, compiled_ms: float = 20.0) -> dict[str, Any]:
    """What the compile process answers (:func:`lib_optim.bench.cold_warm.measure`), with made-up figures."""
    return {
        "mode": spec["mode"],
        "backend": spec["backend"],
        "eager_s": eager_ms / 1000,
        "compiled_s": compiled_ms / 1000,
        "speedup": eager_ms / compiled_ms,
        "compile_s": 40.0 if spec["cache"] == "cold" else 5.0,
        "graphs": 12,
        "fell_back": False,
        "eager_peak_bytes": 2000 * MIB,
        "compiled_peak_bytes": 2100 * MIB,
        "extra_bytes": 100 * MIB,
    }


class FakeChild:
    """The compile process, recorded: each call's spec, environment, timeout and the cache folder's files then."""

    def __init__(
        self, clock: FakeClock | None = None, seconds: float = 0.0, fail: dict[str, BaseException] | None = None
    ):
        self.calls: list[dict[str, Any]] = []
        self.clock, self.seconds, self.fail = clock, seconds, fail or {}

    def __call__(self, spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
        cache = Path(env["TORCHINDUCTOR_CACHE_DIR"])
        self.calls.append({"spec": spec, "env": env, "timeout": timeout, "files": cold_warm.count_files(cache.parent)})
        if self.clock is not None:
            self.clock.now += self.seconds
        failure = self.fail.get(f"{spec['mode']}/{spec['cache']}")
        if failure is not None:
            raise failure
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{spec['mode']}-{spec['cache']}.bin").write_text("kernel", encoding="utf-8")
        return compile_row(spec)


def fake_vae_measure(calls: list[dict[str, Any]]) -> Any:
    def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        calls.append({**spec, "timeout": timeout})
        return {"peak_bytes": 20 * MIB if spec["variant"] == "untiled" else 12 * MIB, "seconds": 0.5, "method": "fake"}

    return measure


def cpu_host_backends() -> set[Any]:
    """The hosts' backends that run on the CPU: what the quick report times."""
    return set(host_backends()) & set(impl.available_backends("cpu"))


def quick_plan(**kwargs: Any) -> gr.ReportPlan:
    return gr.make_plan("cpu", quick=True, compile_backend="eager", **kwargs)


# --- the matrix ---------------------------------------------------------------------------------------------


def test_full_plan_is_the_issue_matrix_and_quick_is_tiny() -> None:
    full = gr.make_plan("cuda")
    assert full.parts == ("attention", "vae", "compile")
    assert full.dtypes == ("fp16", "bf16") and full.attention_specs == ("sd15-512", "sdxl-1024")
    assert full.vae_sizes == (1024, 2048) and full.vae_dtype == "fp16"
    assert full.compile_modes == ("on", "max-autotune") and full.compile_backend == "inductor"
    assert full.compile_spec == {**gr.FULL_COMPILE, "dtype": "fp16", "device": "cuda"}
    assert full.compile_spec["model_channels"] == 320 and full.compile_spec["latent"] == [64, 64]
    quick = gr.make_plan("cpu", quick=True)
    assert quick.dtypes == ("fp32",) and quick.attention_specs == ("tiny",) and quick.vae_sizes == (128,)
    assert quick.compile_spec["unet"] == "one-level" and quick.compile_spec["dtype"] == "fp32"
    assert gr.make_plan("cuda", dtype="bf16").dtypes == ("bf16",)
    assert gr.make_plan("cuda", parts=["compile", "attention"]).parts == ("attention", "compile")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parts": ["attention", "unet"]}, "--parts: 'unet' is not allowed; allowed: attention, vae, compile"),
        ({"parts": []}, "--parts: none given"),
        ({"dtype": "fp8"}, "--dtype: 'fp8' is not allowed; allowed: fp32, fp16, bf16"),
        ({"compile_backend": "tvm"}, "--compile-backend: 'tvm' is not allowed; allowed: inductor, aot_eager, eager"),
        ({"compile_modes": ["reduce-overhead"]}, "compile mode: 'reduce-overhead' is not allowed"),
    ],
)
def test_bad_plan_names_the_field_value_and_what_is_allowed(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gr.make_plan("cpu", **kwargs)
    with pytest.raises(ValueError, match="--device: 'mps' is not allowed; allowed: cpu, cuda"):
        gr.make_plan("mps")


def test_target_labels_are_every_row_the_attention_bench_can_time() -> None:
    labels = target_labels("cpu", "fp32")
    assert {b.value for b in cpu_host_backends()} <= set(labels) and "xformers" not in labels  # what runs here
    assert "sdp-math" in labels  # the SDPA kernels are timed too, not only the registered backends
    result = run_bench(["tiny"], device="cpu", quick=True, dtype="fp32", backends=labels, repeats=1)
    assert {r.backend for r in result.rows} == set(labels)


# --- a quick CPU report: the JSON and the markdown -------------------------------------------------------------


def test_quick_cpu_report_json_schema_and_markdown(tmp_path: Path) -> None:
    vae_calls: list[dict[str, Any]] = []
    child = FakeChild()
    report = gr.run_gpu_report(quick_plan(), vae_measure=fake_vae_measure(vae_calls), compile_child=child)
    json_path, md_path = gr.write_report(report, tmp_path / "out")
    assert (json_path.name, md_path.name) == ("gpu-report.json", "gpu-report.md")
    data = json.loads(json_path.read_text(encoding="utf-8"))

    assert {"schema", "device", "quick", "budget_s", "elapsed_s", "environment", "plan", "parts"} <= set(data)
    assert {"attention", "vae", "compile"} <= set(data)
    assert (data["schema"], data["device"], data["quick"], data["budget_s"]) == (1, "cpu", True, gr.QUICK_BUDGET_S)
    assert {"python", "torch", "cuda", "triton", "date"} <= set(data["environment"])
    assert [p["name"] for p in data["parts"]] == [
        "attention/fp32/tiny",
        "vae/128",
        "compile/on/cold",
        "compile/on/warm",
        "compile/max-autotune/cold",
        "compile/max-autotune/warm",
    ]
    assert all(p["status"] == "ok" and p["skipped"] is None for p in data["parts"]), data["parts"]
    # attention ran for real: the hosts' backends at the tiny shape's self- and cross-attention call
    assert {(r["backend"], r["kind"]) for r in data["attention"]} == {
        (b.value, k) for b in cpu_host_backends() for k in ("self", "cross")
    }
    assert all(r["dtype"] == "fp32" and r["median_ms"] > 0 for r in data["attention"])
    assert {"spec", "call", "ratio", "rounds", "measured_bytes", "predicted_bytes", "skipped"} <= set(
        data["attention"][0]
    )
    # the VAE: whole and tiled at 128², each reading given the time left as its timeout
    assert [(r["size"], r["variant"]) for r in data["vae"]] == [(128, "untiled"), (128, "module/exact")]
    assert [c["tile"] for c in vae_calls] == [None, 12] and all(0 < c["timeout"] <= 120 for c in vae_calls)
    assert data["vae"][1]["measured_bytes"] == 12 * MIB and data["vae"][1]["skipped"] is None
    # compile: each mode cold then warm
    assert [(r["mode"], r["cache"]) for r in data["compile"]] == [
        ("on", "cold"),
        ("on", "warm"),
        ("max-autotune", "cold"),
        ("max-autotune", "warm"),
    ]
    assert {"eager_s", "compiled_s", "compile_s", "process_s", "cache_files_before", "extra_bytes"} <= set(
        data["compile"][0]
    )

    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# GPU report\n")
    attention = _table_after(md, "## Attention")
    assert attention[0].strip("| ").split(" | ")[:3] == ["shape", "call", "dtype"]
    assert set(attention[0].strip("| ").split(" | ")[3:]) == {b.value for b in cpu_host_backends()}  # a column each
    assert len(attention) == 2 + 2 and "(×1.00)" in attention[2]  # header, rule, self and cross
    compiled = _table_after(md, "## Regional compile")
    assert len(compiled) == 2 + 4
    assert compiled[2].startswith("| on | cold | 30.00 | 20.00 | 1.50× | 40.0 |")
    assert compiled[2].endswith("| 2,000 | 2,100 | +100 |")
    vae = _table_after(md, "## VAE decode")
    assert vae[2].startswith("| 128 | untiled | — | fp32 | 0.50 | 20 |")
    parts = _table_after(md, "## Parts")
    assert len(parts) == 2 + 6 and parts[2].startswith("| attention/fp32/tiny | ok |")


def _table_after(markdown: str, heading: str) -> list[str]:
    """The markdown table's lines under the section that starts with ``heading``."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


# --- the budget: an injected clock --------------------------------------------------------------------------


def test_a_part_past_the_deadline_is_skipped_and_never_run() -> None:
    clock = FakeClock()
    attention_calls: list[str] = []

    def slow_attention(specs: list[str], **kwargs: Any) -> Any:
        attention_calls.append(specs[0])
        clock.now += 80.0  # the first part eats most of the 100 s budget
        return SimpleNamespace(rows=[])

    vae_calls: list[dict[str, Any]] = []
    child = FakeChild(clock, seconds=15.0)
    report = gr.run_gpu_report(
        quick_plan(),
        budget_s=100.0,
        clock=clock,
        attention=slow_attention,
        vae_measure=fake_vae_measure(vae_calls),
        compile_child=child,
    )
    status = {p.name: (p.status, p.skipped) for p in report.parts}
    assert status["attention/fp32/tiny"] == ("ok", None)
    assert status["vae/128"] == ("ok", None)  # 20 s left: it fits
    assert status["compile/on/cold"] == ("ok", None)  # 20 s left when it starts, 5 s after
    assert status["compile/on/warm"] == ("ok", None)  # 5 s left: still over the quick minimum; -10 s after
    assert status["compile/max-autotune/cold"] == ("skipped", "budget")
    assert status["compile/max-autotune/warm"] == ("skipped", "the cold run did not finish")
    assert [(c["spec"]["mode"], c["spec"]["cache"]) for c in child.calls] == [("on", "cold"), ("on", "warm")]
    assert [c["timeout"] for c in child.calls] == [20.0, 5.0]  # each process may run for the time left, no more
    assert attention_calls == ["tiny"] and len(vae_calls) == 2
    assert report.elapsed_s == pytest.approx(110.0)
    assert [r["cache"] for r in report.compile] == ["cold", "warm"]


def test_a_part_that_needs_more_than_is_left_is_skipped() -> None:
    clock = FakeClock()
    child = FakeChild(clock, seconds=0.0)
    plan = gr.make_plan("cpu", quick=True, compile_backend="eager", parts=["compile"], compile_modes=["on"])
    needs = {**plan.needs_s, "compile/cold": 30.0}
    plan = dataclasses.replace(plan, needs_s=needs)
    report = gr.run_gpu_report(plan, budget_s=29.0, clock=clock, compile_child=child)
    (cold, warm) = report.parts
    assert (cold.status, cold.skipped, cold.note) == ("skipped", "budget", "29 s left, it needs about 30 s")
    assert warm.skipped == "the cold run did not finish" and child.calls == [] and report.compile == []


def test_a_compile_process_killed_at_the_deadline_is_budget_and_a_failure_does_not_stop_the_rest() -> None:
    clock = FakeClock()
    child = FakeChild(
        clock,
        seconds=1.0,
        fail={
            "on/cold": subprocess.TimeoutExpired(["python"], 5.0),
            "max-autotune/warm": RuntimeError("[Optim] gpu report: the compile process failed (1): CUDA out of memory"),
        },
    )
    report = gr.run_gpu_report(quick_plan(parts=["compile"]), budget_s=60.0, clock=clock, compile_child=child)
    status = {p.name: (p.status, p.skipped, p.error) for p in report.parts}
    assert status["compile/on/cold"] == ("skipped", "budget", None)
    assert status["compile/on/warm"] == ("skipped", "the cold run did not finish", None)
    assert status["compile/max-autotune/cold"] == ("ok", None, None)
    assert status["compile/max-autotune/warm"][0] == "failed"
    assert "CUDA out of memory" in (status["compile/max-autotune/warm"][2] or "")
    md = format_markdown(report.to_dict())
    rows = _table_after(md, "## Regional compile")
    assert rows[2].startswith("| on | cold | skipped: budget; stopped after 60 s |")
    assert rows[5].startswith("| max-autotune | warm | failed: RuntimeError: [Optim] gpu report: the compile process")


def test_a_vae_reading_cut_by_the_budget_says_budget() -> None:
    def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        if spec["variant"] != "untiled":
            raise subprocess.TimeoutExpired(["python"], timeout)
        return {"peak_bytes": 20 * MIB, "seconds": 0.5, "method": "fake"}

    report = gr.run_gpu_report(quick_plan(parts=["vae"]), clock=FakeClock(), vae_measure=measure)
    assert [(r["variant"], r["skipped"]) for r in report.vae] == [("untiled", None), ("module/exact", "budget")]


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"--budget: 0.0 is not allowed; allowed: seconds > 0"):
        gr.run_gpu_report(quick_plan(), budget_s=0.0)


# --- cold and warm: one fresh cache folder, two processes -----------------------------------------------------


def test_cold_then_warm_share_one_fresh_cache_the_shell_cannot_redirect(tmp_path: Path) -> None:
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "OPTIM_COMPILE_CACHE": str(tmp_path / "persistent"),
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "users-cache"),
    }
    child = FakeChild()
    gr.run_gpu_report(quick_plan(parts=["compile"]), compile_child=child, environ=environ)
    on_cold, on_warm, mat_cold, mat_warm = child.calls
    assert on_cold["env"] == on_warm["env"]  # the same folder for both processes of a mode
    env = on_cold["env"]
    cache = Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor") and env["TRITON_CACHE_DIR"] == str(
        cache / "triton"
    )
    assert not str(cache).startswith(str(tmp_path))  # a new folder, not the shell's
    assert "OPTIM_COMPILE_CACHE" not in env and "TORCHINDUCTOR_FORCE_DISABLE_CACHES" not in env
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert (on_cold["files"], on_warm["files"]) == (0, 1)  # cold starts empty; warm finds what cold left
    assert mat_cold["env"]["TORCHINDUCTOR_CACHE_DIR"] != env["TORCHINDUCTOR_CACHE_DIR"] and mat_cold["files"] == 0
    assert mat_warm["files"] == 1
    assert not cache.exists()  # removed afterwards


def test_the_compile_process_is_killed_at_its_timeout(tmp_path: Path) -> None:
    env = cold_warm.cache_env(tmp_path, os.environ)
    with pytest.raises(subprocess.TimeoutExpired):
        cold_warm.run_child({"unet": "sd15"}, env, 0.01)


def test_a_failing_compile_process_says_why(tmp_path: Path) -> None:
    env = cold_warm.cache_env(tmp_path, os.environ)
    spec = {**gr.QUICK_COMPILE, "unet": "resnet", "dtype": "fp32", "device": "cpu", "mode": "on", "backend": "eager"}
    with pytest.raises(RuntimeError, match=r"compile process failed \(1\): ValueError: \[Optim\] compile bench: unet="):
        cold_warm.run_child(spec, env, 120.0)


def test_the_compile_measurement_reports_time_cache_and_no_cuda_peak_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    (tmp_path / "left-by-cold").write_text("x", encoding="utf-8")
    spec = {**gr.QUICK_COMPILE, "rounds": 1, "dtype": "fp32", "device": "cpu", "mode": "off", "backend": "eager"}
    data = cold_warm.measure(spec)
    assert (data["unet"], data["blocks"], data["mode"], data["context_dim"]) == ("one-level", 9, "off", 16)
    assert data["cache_dir"] == str(tmp_path) and data["cache_files_found"] == 1
    assert data["eager_peak_bytes"] is None and data["compiled_peak_bytes"] is None and data["extra_bytes"] is None
    assert data["measure_s"] > 0 and data["eager_s"] > 0


def test_compile_bench_names_an_unknown_unet() -> None:
    with pytest.raises(ValueError, match=r"unet='resnet' is unknown; allowed: sd15, one-level"):
        cb.run_compile_bench(unet="resnet")
    result = cb.CompileBenchResult((8, 8), 1, 8, 9, "eager", "on", "cuda", "float16", 1, 0.02, 0.01, 1.0, 1, 1, 0)
    result.eager_peak_bytes, result.compiled_peak_bytes = 100, 130
    assert result.to_dict()["extra_bytes"] == 30


# --- the command line and tools/measure_gpu.sh -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--parts", "attention,unet"], "--parts: 'unet' is not allowed; allowed: attention, vae, compile"),
        (["--budget", "0"], "--budget: 0.0 is not allowed; allowed: seconds > 0"),
        (["--vae"], "--vae is not allowed with it"),
    ],
)
def test_cli_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["bench", "--gpu-report", "--device", "cpu", "--quick", *argv])
    assert rc == cli.EX_USAGE
    assert message in capsys.readouterr().err


def test_cli_refuses_an_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "report.txt"
    path.write_text("", encoding="utf-8")
    assert cli.main(["bench", "--gpu-report", "--device", "cpu", "--out", str(path)]) == cli.EX_USAGE
    assert f"--out: {str(path)!r} is a file; allowed: a folder" in capsys.readouterr().err


def test_measure_gpu_sh_passes_its_arguments(tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    args = ["--device", "cpu", "--quick", "--parts", "attention", "--budget", "90", "--out", str(out), "--json"]
    proc = subprocess.run(
        [str(ROOT / "tools" / "measure_gpu.sh"), *args],
        cwd=tmp_path,  # not the checkout: the script finds lib_optim itself
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # --json reached the command: the JSON on stdout
    assert (data["device"], data["quick"], data["budget_s"], data["plan"]["parts"]) == (
        "cpu",
        True,
        90.0,
        ["attention"],
    )
    assert [p["name"] for p in data["parts"]] == ["attention/fp32/tiny"]
    assert json.loads((out / "gpu-report.json").read_text(encoding="utf-8")) == data
    assert (out / "gpu-report.md").read_text(encoding="utf-8").startswith("# GPU report")
    assert f"written to {out / 'gpu-report.json'} and {out / 'gpu-report.md'}" in proc.stderr
    assert "[Optim] gpu report: attention/fp32/tiny: ok" in proc.stderr


def test_measure_gpu_sh_defaults_to_cuda_and_says_so_without_a_gpu(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the default would run the report")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "tools" / "measure_gpu.sh"), "--out", str(tmp_path / "r")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == cli.EX_USAGE
    assert "--device: 'cuda' is not allowed here (torch sees no GPU); allowed: cpu" in proc.stderr
