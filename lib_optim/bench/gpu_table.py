"""The GPU report as markdown, from its JSON (:meth:`lib_optim.bench.gpu_report.GpuReport.to_dict`, or a saved
``gpu-report.json``): a line on the machine, then one table per part of the matrix (attention, VAE, compile)
and the parts with their status and seconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Report = dict[str, Any]  # the report's JSON

MIB = 1 << 20
NOT_RUN = "—"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> list[str]:
    """A markdown table; ``right[i]``: column ``i`` is right-aligned (numbers)."""
    align = right or [False] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in align) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _mib(n: Any) -> str:
    return NOT_RUN if n is None else f"{n / MIB:,.0f}"


def _ms(ms: Any) -> str:
    if ms is None:
        return NOT_RUN
    return f"{ms:.3f}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def _num(value: Any, fmt: str) -> str:
    return NOT_RUN if value is None else (value if isinstance(value, str) else format(value, fmt))


def format_markdown(report: Report) -> str:
    lines = ["# GPU report", "", environment_line(report), ""]
    parts = report["plan"]["parts"]
    if "attention" in parts:
        lines += attention_section(report)
    if "vae" in parts:
        lines += vae_section(report)
    if "compile" in parts:
        lines += compile_section(report)
    lines += ["## Parts", ""]
    lines += table(
        ("part", "status", "seconds", "note"),
        [(p["name"], p["status"], _num(p["seconds"], ".1f"), _part_note(p)) for p in report["parts"]],
        (False, False, True, False),
    )
    return "\n".join(lines)


def _part_note(part: dict[str, Any]) -> str:
    return "; ".join(x for x in (part.get("skipped"), part.get("error"), part.get("note")) if x)


def environment_line(report: Report) -> str:
    env = report["environment"]
    machine = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    if env.get("gpu"):
        machine += f" (compute capability {env.get('capability')}, {_mib(env.get('gpu_memory_bytes'))} MiB)"
    soft = [f"torch {env.get('torch')}"]
    soft += [f"CUDA {env['cuda']}"] if env.get("cuda") else []
    soft += [f"triton {env['triton']}"] if env.get("triton") else []
    soft += [f"Python {env.get('python')}"]
    mode = " --quick" if report["quick"] else ""
    return (
        f"{machine} · {' · '.join(soft)} · {env.get('date')}  \n"
        f"`python -m lib_optim bench --gpu-report --device {report['device']}{mode}`: "
        f"{report['elapsed_s']:.0f} s of its {report['budget_s']:.0f} s budget."
    )


def attention_section(report: Report) -> list[str]:
    """One row per call and dtype, one column per backend: median ms and ×best."""
    rows = report["attention"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    keys = list(dict.fromkeys((r["spec"], r["call"], r["dtype"]) for r in rows))
    lines = [
        "## Attention: median ms per call (×best)",
        "",
        "The largest self- and cross-attention call of each shape; every backend and SDPA kernel that runs here. "
        f"{NOT_RUN}: not run (see the JSON's `skipped`).",
        "",
    ]
    body = []
    for spec, call, dtype in keys:
        cells = []
        for backend in backends:
            match = [
                r for r in rows if (r["spec"], r["call"], r["dtype"], r["backend"]) == (spec, call, dtype, backend)
            ]
            r = match[0] if match else {}
            ratio = r.get("ratio")
            cells.append(_ms(r.get("median_ms")) + ("" if ratio is None else f" (×{ratio:.2f})"))
        body.append((spec, call, dtype, *cells))
    lines += table(("shape", "call", "dtype", *backends), body, (False,) * 3 + (True,) * len(backends))
    return [*lines, ""]


def vae_section(report: Report) -> list[str]:
    lines = ["## VAE decode: whole vs tiled", ""]
    body = [
        (
            str(r["size"]),
            r["variant"],
            NOT_RUN if r.get("tile") is None else f"{r['tile']} (overlap {r['overlap']})",
            r.get("dtype", ""),
            _num(r.get("seconds"), ".2f"),
            _mib(r.get("measured_bytes")),
            _mib(r.get("predicted_bytes")),
            _num(r.get("psnr_db"), ".1f"),
            r.get("skipped") or "",
        )
        for r in report["vae"]
    ]
    header = ("size", "decode", "tile (latent px)", "dtype", "seconds", "peak MiB", "predicted MiB", "PSNR dB", "note")
    lines += table(header, body, (True, False, False, False, True, True, True, True, False))
    return [*lines, ""]


def compile_section(report: Report) -> list[str]:
    """One row per mode and cache state, from the parts (a skipped part keeps its row, with the reason)."""
    spec = report["plan"]["compile_spec"]
    lines = [
        f"## Regional compile: {spec['unet']}-shaped UNet, {spec['model_channels']} channels, latent "
        f"{spec['latent'][0]}×{spec['latent'][1]}, batch {spec['batch']}, {spec['dtype']}, "
        f"backend {report['plan']['compile_backend']}",
        "",
        "Steady ms: medians of interleaved eager/compiled calls. compile s: the compiler's own accounting; "
        "process s: the whole fresh process (start-up, model, compile, timing). Peaks: "
        "`torch.cuda.max_memory_allocated` over one steady call, weights included.",
        "",
    ]
    header: tuple[str, ...] = ("mode", "cache", "eager ms", "compiled ms", "speedup", "compile s", "process s")
    header += ("graphs", "eager peak MiB", "compiled peak MiB", "extra MiB")
    body = []
    for part in (p for p in report["parts"] if p["name"].startswith("compile/")):
        _, mode, cache = part["name"].split("/")
        match = [r for r in report["compile"] if r.get("mode") == mode and r.get("cache") == cache]
        if not match:
            body.append((mode, cache, f"{part['status']}: {_part_note(part)}", *[""] * (len(header) - 3)))
            continue
        r = match[0]
        extra = r.get("extra_bytes")
        body.append(
            (
                mode + (" (fell back)" if r.get("fell_back") else ""),
                cache,
                _ms(r["eager_s"] * 1000),
                _ms(r["compiled_s"] * 1000),
                _num(r.get("speedup"), ".2f") + ("×" if r.get("speedup") is not None else ""),
                _num(r.get("compile_s"), ".1f"),
                _num(r.get("process_s"), ".1f"),
                str(r.get("graphs", "")),
                _mib(r.get("eager_peak_bytes")),
                _mib(r.get("compiled_peak_bytes")),
                NOT_RUN if extra is None else f"{extra / MIB:+,.0f}",
            )
        )
    lines += table(header, body, (False, False) + (True,) * (len(header) - 2))
    return [*lines, ""]
