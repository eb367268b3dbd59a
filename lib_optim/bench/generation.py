"""The in-WebUI benchmark: one short generation per candidate, one change at a time from the current settings.

Plain Python (no gradio, no host code): which candidates to try, the result of each, the table, the winner,
the JSON/CSV files and an HTML bar chart. :mod:`lib_optim.hosts.optim_tab` runs the generations.

A candidate is the current settings (the *baseline*, always first) or the baseline with exactly one field
changed — for each field of :data:`lib_optim.settings.FIELDS` the host supports, by its kind: another
available attention backend, a switch flipped, another choice, or half and double a memory budget. The
winner is the fastest candidate that did not fail — if its lead over the baseline is larger than the noise
between runs (:func:`verdict`); otherwise the baseline stays.
"""

from __future__ import annotations

import csv
import html
import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from lib_optim.attention import Attention
from lib_optim.host_specs import HostKind
from lib_optim.settings import (
    FIELDS_BY_NAME,
    SETTING_FIELDS,
    SETTING_NAMES,
    AttentionKind,
    BoolKind,
    ChoiceKind,
    FieldsMap,
    FieldsView,
    GenerationSettings,
    MegabytesKind,
    SettingsError,
    Tri,
    TriKind,
    from_dict,
)

BASELINE = "baseline"
# What can be varied: the setting fields, in the order candidates are listed.
KINDS = SETTING_NAMES
KIND_LABELS: Mapping[str, str] = FieldsMap(lambda spec: spec.label, lambda: SETTING_FIELDS)
KIND_ALIASES = {"inference_memory": "inference_memory_mb"}  # the name before the fields named the kinds
# Never offered as a candidate: "host"/"auto" are not backends of their own, and "none" (A1111's unoptimized
# attention) is the slowest and hungriest there is — measure it explicitly through the API if wanted.
_NOT_CANDIDATES = (Attention.HOST, Attention.AUTO, Attention.NONE)
FORGE_DEFAULT_INFERENCE_MEMORY_MB = 1024  # Forge's minimum_inference_memory() (docs/hosts.md §4.3)

# Request limits (POST /optim/v1/bench and the tab).
SIZE_MIN, SIZE_MAX, SIZE_STEP = 64, 2048, 8
STEPS_MIN, STEPS_MAX = 1, 50
SEED_MAX = 2**32 - 1
DEFAULT_PROMPT = "a photograph of a lighthouse on a cliff at sunset"
REPEATS_MAX = 5
REQUEST_KEYS = ("prompt", "width", "height", "steps", "seed", "kinds", "candidates", "repeats")


@dataclass(frozen=True)
class BenchCandidate:
    label: str  # "baseline" or the one change, "attention=sdp"
    settings: GenerationSettings

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "settings": self.settings.to_dict()}


def change_label(base: GenerationSettings, settings: GenerationSettings) -> str:
    """``attention=sdp, channels_last=on``: what differs from ``base``, in the controls' words."""
    changed = [
        f"{spec.name}={spec.kind.to_ui(getattr(settings, spec.name))}"
        for spec in SETTING_FIELDS
        if getattr(settings, spec.name) != getattr(base, spec.name)
    ]
    return ", ".join(changed) if changed else BASELINE


def _flip(value: Tri, current: bool | None) -> Tri:
    """The opposite of what this generation would do: of the host's state when ``value`` is inherit."""
    if value is Tri.ON:
        return Tri.OFF
    if value is Tri.OFF:
        return Tri.ON
    return Tri.OFF if current else Tri.ON


def _megabyte_values(kind: MegabytesKind, current: int) -> list[int]:
    """Half and double the current budget (multiples of 64 MB, within the allowed range)."""
    out = []
    for value in (current // 2, current * 2):
        rounded = max(kind.low, min(kind.high, value // 64 * 64))
        if rounded != current and rounded not in out:
            out.append(rounded)
    return out


def _variants(name: str, value: Any, available_attention: Sequence[Attention], current: Any, running: Any) -> list[Any]:
    """The other values of one field worth a candidate, by the field's kind."""
    spec = FIELDS_BY_NAME[name]
    kind = spec.kind
    if spec.bench_values is not None:
        return [v for v in spec.bench_values if v != value]
    if isinstance(kind, AttentionKind):
        return [a for a in available_attention if a not in _NOT_CANDIDATES and a != running]
    if isinstance(kind, TriKind):
        return [_flip(value, current)]
    if isinstance(kind, BoolKind):
        return [not value]
    if isinstance(kind, MegabytesKind):
        return list(_megabyte_values(kind, value or current or FORGE_DEFAULT_INFERENCE_MEMORY_MB))
    if isinstance(kind, ChoiceKind):
        return [m for m in kind.enum if m != value]
    return []


def parse_kinds(value: object) -> tuple[str, ...]:
    """The ``kinds`` of a request: field names (``inference_memory`` is still accepted)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(k, str) for k in items):
        raise SettingsError("kinds", value, "a list of " + ", ".join(KINDS))
    out: list[str] = []
    for item in items:
        name = KIND_ALIASES.get(item, str(item))
        if name not in KINDS:
            raise SettingsError("kinds", item, ", ".join(KINDS))
        out.append(name)
    return tuple(out)


def candidates(
    base: GenerationSettings,
    available_attention: Iterable[Attention | str],
    supported_fields: Iterable[str],
    *,
    kinds: Iterable[str] | None = None,
    current: Mapping[str, Any] | None = None,
) -> list[BenchCandidate]:
    """The baseline (``base``, switched on) first, then one change at a time, without duplicates.

    ``supported_fields``: the fields the host can apply here (the others stay at their default and are not
    varied). ``current``: what the host does right now, by field, so that a change is a real change — the
    attention backend the host runs (not offered again when ``base`` leaves attention to the host), whether
    the UNet is in channels-last and the VAE on the CPU (a flip of "inherit" is the opposite of these), and
    Forge's inference memory. ``kinds``: which fields to vary (default: all).
    """
    wanted = set(parse_kinds(list(kinds)) if kinds is not None else KINDS)
    supported = set(supported_fields)
    now = dict(current or {})
    baseline = replace(base, enabled=True)
    unsupported = {spec.name: spec.default for spec in SETTING_FIELDS if spec.name not in supported}
    baseline = replace(baseline, **unsupported)
    out = [BenchCandidate(BASELINE, baseline)]
    seen = {baseline}
    available = [Attention(a) for a in available_attention]
    for spec in SETTING_FIELDS:
        if spec.name not in wanted or spec.name not in supported:
            continue
        value = getattr(baseline, spec.name)
        running = value if value not in (Attention.HOST, Attention.AUTO) else now.get(spec.name)
        for variant in _variants(spec.name, value, available, now.get(spec.name), running):
            settings = replace(baseline, **{spec.name: variant})
            if settings not in seen:
                seen.add(settings)
                out.append(BenchCandidate(change_label(baseline, settings), settings))
    return out


# --- results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateResult:
    label: str
    settings: GenerationSettings
    seconds: float | None = None  # wall time of the whole generation (model already loaded)
    it_per_s: float | None = None  # sampling steps per second
    steps: int | None = None  # sampling steps counted (the hires pass's included)
    peak_vram_mb: float | None = None  # torch's peak allocated memory on the GPU, when known
    peak_ram_mb: float | None = None  # the process's peak resident memory, when known
    error: str | None = None  # why it failed ("out of memory: ...")
    out_of_memory: bool = False
    attention_used: str = ""  # the host's name of the attention that ran
    notes: tuple[str, ...] = field(default_factory=tuple)
    runs: int = 1  # timed generations behind ``seconds`` (their median)
    run_seconds: tuple[float, ...] = ()  # each timed generation's seconds, when it ran more than once
    compile_seconds: float | None = None  # a compiled candidate: its first (uncounted) run's compile time

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "settings": self.settings.to_dict(),
            "seconds": self.seconds,
            "it_per_s": self.it_per_s,
            "steps": self.steps,
            "peak_vram_mb": self.peak_vram_mb,
            "peak_ram_mb": self.peak_ram_mb,
            "error": self.error,
            "out_of_memory": self.out_of_memory,
            "attention_used": self.attention_used,
            "notes": list(self.notes),
            "runs": self.runs,
            "run_seconds": list(self.run_seconds),
            "compile_seconds": self.compile_seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CandidateResult:
        return cls(
            label=str(data["label"]),
            settings=from_dict(data["settings"]),
            seconds=data.get("seconds"),
            it_per_s=data.get("it_per_s"),
            steps=data.get("steps"),
            peak_vram_mb=data.get("peak_vram_mb"),
            peak_ram_mb=data.get("peak_ram_mb"),
            error=data.get("error"),
            out_of_memory=bool(data.get("out_of_memory", False)),
            attention_used=str(data.get("attention_used", "")),
            notes=tuple(data.get("notes", ())),
            runs=int(data.get("runs", 1)),
            run_seconds=tuple(float(x) for x in data.get("run_seconds", ())),
            compile_seconds=data.get("compile_seconds"),
        )


def combine_runs(runs: Sequence[CandidateResult]) -> CandidateResult:
    """One candidate's result from its repeated runs: the first failure if any run failed (a candidate that
    ran out of memory once is not a safe default), else the median time and rate, the largest peaks."""
    if not runs:
        raise ValueError("combine_runs needs at least one run")
    first = runs[0]
    failed = next((r for r in runs if not r.ok), None)
    if failed is not None:
        return replace(failed, runs=len(runs))
    rates = [r.it_per_s for r in runs if r.it_per_s is not None]
    vram = [r.peak_vram_mb for r in runs if r.peak_vram_mb is not None]
    ram = [r.peak_ram_mb for r in runs if r.peak_ram_mb is not None]
    return replace(
        first,
        seconds=round(statistics.median(r.seconds or 0.0 for r in runs), 4),
        it_per_s=round(statistics.median(rates), 3) if rates else None,
        peak_vram_mb=max(vram) if vram else None,
        peak_ram_mb=max(ram) if ram else None,
        notes=tuple(dict.fromkeys(n for r in runs for n in r.notes)),
        runs=len(runs),
        run_seconds=tuple(r.seconds or 0.0 for r in runs) if len(runs) > 1 else (),
    )


# With one run per candidate nothing says how much a generation's time varies; short generations on a busy
# machine vary by this much (a 64×64 CPU candidate won by 1.08× once and lost on the two reruns), so a lead
# must beat it.
SINGLE_RUN_NOISE = 0.15


def fastest(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """The fastest candidate that succeeded (the earlier one on a tie); None if none did."""
    best: CandidateResult | None = None
    for result in results:
        if result.ok and (best is None or (result.seconds or 0.0) < (best.seconds or 0.0)):
            best = result
    return best


def _spread(result: CandidateResult) -> float | None:
    return max(result.run_seconds) - min(result.run_seconds) if len(result.run_seconds) > 1 else None


@dataclass(frozen=True)
class Verdict:
    """What the run recommends: ``winner`` (None when nothing finished) and, when the fastest candidate's lead
    over the baseline is within the noise, why the baseline is kept."""

    winner: CandidateResult | None
    note: str = ""


def verdict(results: Sequence[CandidateResult]) -> Verdict:
    """The baseline is replaced only by a candidate whose lead over it is larger than the run-to-run spread of
    either (their slowest minus fastest run), or — with single runs, whose spread is unknown — larger than
    :data:`SINGLE_RUN_NOISE` of the baseline's time. Without a baseline (an explicit list) the fastest wins."""
    best = fastest(results)
    baseline = next((r for r in results if r.label == BASELINE and r.ok), None)
    if best is None or baseline is None or best is baseline:
        return Verdict(best)
    base_s = baseline.seconds or 0.0
    faster = sorted((r for r in results if r.ok and (r.seconds or 0.0) < base_s), key=lambda r: r.seconds or 0.0)
    for candidate in faster:
        spreads = [x for x in (_spread(baseline), _spread(candidate)) if x is not None]
        noise = max(spreads) if len(spreads) == 2 else SINGLE_RUN_NOISE * base_s
        if base_s - (candidate.seconds or 0.0) > noise:
            return Verdict(candidate)
    lead = base_s - (best.seconds or 0.0)
    how = (
        "the spread between its runs" if best.runs > 1 and baseline.runs > 1 else "what one run per candidate can tell"
    )
    return Verdict(
        baseline,
        f"{best.label} was {lead:.2f} s faster than your current settings, which is within {how}; keeping "
        "your current settings" + ("" if best.runs > 1 else " (run with Repeats 3 or more to tell)") + ".",
    )


def winner(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """The recommended candidate (see :func:`verdict`)."""
    return verdict(results).winner


def summarize(results: Sequence[CandidateResult]) -> list[dict[str, Any]]:
    """Table rows in run order: ``ratio`` = seconds / the fastest's seconds (None if failed); ``winner`` marks
    the recommended one (:func:`verdict`)."""
    best = winner(results)
    quickest = fastest(results)
    rows = []
    for result in results:
        ratio = None
        if result.ok and quickest is not None and quickest.seconds:
            ratio = round((result.seconds or 0.0) / quickest.seconds, 3)
        rows.append(
            {
                "label": result.label,
                # each setting in the controls' words (on/off/inherit, not true/false/null)
                **{spec.name: spec.kind.to_ui(getattr(result.settings, spec.name)) for spec in SETTING_FIELDS},
                "seconds": None if result.seconds is None else round(result.seconds, 3),
                "it_per_s": None if result.it_per_s is None else round(result.it_per_s, 3),
                "steps": result.steps,
                "runs": result.runs,
                "compile_seconds": result.compile_seconds,
                "peak_vram_mb": None if result.peak_vram_mb is None else round(result.peak_vram_mb, 1),
                "peak_ram_mb": None if result.peak_ram_mb is None else round(result.peak_ram_mb, 1),
                "ratio": ratio,
                "winner": result is best,
                "attention_used": result.attention_used,
                "error": result.error,
            }
        )
    return rows


_RESULT_COLUMNS = (
    "seconds",
    "it_per_s",
    "steps",
    "runs",
    "compile_seconds",
    "peak_vram_mb",
    "peak_ram_mb",
    "ratio",
    "winner",
    "attention_used",
    "error",
)
CSV_COLUMNS: Sequence[str] = FieldsView(lambda: ("label", *SETTING_NAMES, *_RESULT_COLUMNS))


def _unique_stem(directory: Path, stem: str) -> str:
    candidate, n = stem, 1
    while (directory / f"{candidate}.json").exists() or (directory / f"{candidate}.csv").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def write_results(
    results: Sequence[CandidateResult],
    directory: str | Path,
    *,
    meta: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Write ``optim-bench-<time>.json`` (everything) and ``.csv`` (the table); returns both paths."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    when = now or datetime.now().astimezone()
    stem = _unique_stem(folder, f"optim-bench-{when.strftime('%Y%m%d-%H%M%S')}")
    json_path, csv_path = folder / f"{stem}.json", folder / f"{stem}.csv"
    rows = summarize(results)
    best = winner(results)
    document = {
        "format": "sd-webui-optim bench 1",
        "created": when.isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
        "winner": None if best is None else best.label,
        "winner_settings": None if best is None else best.settings.to_dict(),
        "rows": rows,
        "results": [r.to_dict() for r in results],
    }
    json_path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    return json_path, csv_path


def load_results(path: str | Path) -> list[CandidateResult]:
    """The results of a JSON file written by :func:`write_results`."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    return [CandidateResult.from_dict(item) for item in document["results"]]


# --- HTML (plain HTML/CSS with inline styles: no gradio- or host-specific classes) -------------------------

_WIN = "#3fa34d"
_BAR = "#5b8def"
_FAIL = "#d9534f"


def _num(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


def bars_html(results: Sequence[CandidateResult]) -> str:
    """A horizontal bar per candidate, length proportional to its time (shorter is better)."""
    if not results:
        return '<div class="optim-bench-bars">No results.</div>'
    best = winner(results)
    quickest = fastest(results)
    longest = max((r.seconds or 0.0) for r in results if r.ok) if any(r.ok for r in results) else 0.0
    parts = ['<div class="optim-bench-bars" style="display:flex;flex-direction:column;gap:4px;width:100%">']
    for result in results:
        label = html.escape(result.label)
        if result.ok and longest > 0:
            width = max(1.0, 100.0 * (result.seconds or 0.0) / longest)
            color = _WIN if result is best else _BAR
            text = f"{_num(result.seconds, ' s')} · {_num(result.it_per_s, ' it/s')}"
            if result is quickest:
                text += " · fastest"
            if result is best:
                text += " · recommended"
            bar = (
                f'<div style="width:{width:.1f}%;background:{color};height:1.2em;border-radius:3px"></div>'
                f'<span style="white-space:nowrap;margin-left:6px">{html.escape(text)}</span>'
            )
        else:
            reason = "out of memory" if result.out_of_memory else "failed"
            bar = f'<span style="color:{_FAIL}">{html.escape(reason)}: {html.escape(result.error or "no time")}</span>'
        parts.append(
            '<div style="display:flex;align-items:center;gap:6px">'
            f'<span style="flex:0 0 14em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap" title="{label}">'
            f"{label}</span>"
            f'<div style="flex:1 1 auto;display:flex;align-items:center">{bar}</div></div>'
        )
    parts.append("</div>")
    return "".join(parts)


def table_html(results: Sequence[CandidateResult]) -> str:
    rows = summarize(results)
    head = (
        "Candidate",
        "Seconds",
        "Runs",
        "Steps",
        "it/s",
        "Compile s",
        "Peak GPU MB",
        "Peak RAM MB",
        "× best",
        "Attention used",
        "Result",
    )
    cell = 'style="padding:2px 8px;text-align:left"'
    out = ['<table class="optim-bench-table" style="border-collapse:collapse;width:100%"><thead><tr>']
    out += [f"<th {cell}>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        result = "recommended" if row["winner"] else ("failed: " + row["error"]) if row["error"] else ""
        values = (
            row["label"],
            _num(row["seconds"], digits=3),
            row["runs"],
            "—" if row["steps"] is None else row["steps"],
            _num(row["it_per_s"]),
            _num(row["compile_seconds"], digits=1),
            _num(row["peak_vram_mb"], digits=0),
            _num(row["peak_ram_mb"], digits=0),
            _num(row["ratio"]),
            row["attention_used"] or "",
            result,
        )
        weight = "font-weight:bold;" if row["winner"] else ""
        out.append(f'<tr style="{weight}">' + "".join(f"<td {cell}>{html.escape(str(v))}</td>" for v in values))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def report_html(results: Sequence[CandidateResult], files: Sequence[str | Path] = (), note: str = "") -> str:
    """Table, bars, the winner and where the files are — what the tab shows."""
    decided = verdict(results)
    best = decided.winner
    if best is None:
        head = "No candidate finished; nothing to recommend."
    elif best.label == BASELINE:
        head = "Keep your current settings." if decided.note else "Your current settings were the fastest."
    else:
        head = f"Fastest: {best.label}."
    parts = [f'<div class="optim-bench-report"><p><b>{html.escape(head)}</b></p>']
    if decided.note:
        parts.append(f'<p class="optim-bench-noise">{html.escape(decided.note)}</p>')
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts += [table_html(results), '<div style="height:8px"></div>', bars_html(results)]
    if files:
        listed = ", ".join(f"<code>{html.escape(str(f))}</code>" for f in files)
        parts.append(f"<p>Saved: {listed}</p>")
    parts.append("</div>")
    return "".join(parts)


def error_html(message: str) -> str:
    return f'<div class="optim-bench-report" style="color:{_FAIL}">{html.escape(message)}</div>'


# --- requests (API and tab) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRequest:
    prompt: str = DEFAULT_PROMPT
    width: int = 512
    height: int = 512
    steps: int = 10
    seed: int = 1
    kinds: tuple[str, ...] = field(default_factory=lambda: tuple(KINDS))
    candidates: tuple[GenerationSettings, ...] | None = None  # explicit list; None = derived from the baseline
    repeats: int = 1  # timed generations per candidate, interleaved; the median counts


def _whole(name: str, value: object, low: int, high: int, multiple: int = 1) -> int:
    allowed = f"a whole number from {low} to {high}" + (f", a multiple of {multiple}" if multiple > 1 else "")
    if isinstance(value, bool):
        raise SettingsError(name, value, allowed)
    number: float
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise SettingsError(name, value, allowed) from None
    else:
        raise SettingsError(name, value, allowed)
    if not math.isfinite(number) or number != int(number):  # NaN, infinities, fractions
        raise SettingsError(name, value, allowed)
    whole = int(number)
    if not low <= whole <= high or whole % multiple:
        raise SettingsError(name, value, allowed)
    return whole


def parse_request(
    payload: Mapping[str, Any],
    *,
    host: HostKind | None = None,
    base: GenerationSettings | None = None,
    validate: Callable[[GenerationSettings], None] | None = None,
) -> BenchRequest:
    """Validate a ``POST /optim/v1/bench`` body; errors (:class:`SettingsError`) name field, value and allowed.

    ``candidates``: a list of partial settings dicts, each completed from ``base`` (the Settings → Optim
    defaults) and run exactly as given, in order. ``validate``: the host's check of one candidate
    (an unavailable backend), raising ``ValueError``.
    """
    if not isinstance(payload, Mapping):
        raise SettingsError("request", payload, "a JSON object with keys " + ", ".join(REQUEST_KEYS))
    unknown = [k for k in payload if k not in REQUEST_KEYS]
    if unknown:
        raise SettingsError("request", unknown[0], "keys " + ", ".join(REQUEST_KEYS))
    prompt = payload.get("prompt", DEFAULT_PROMPT)
    if not isinstance(prompt, str):
        raise SettingsError("prompt", prompt, "a string")
    width = _whole("width", payload.get("width", 512), SIZE_MIN, SIZE_MAX, SIZE_STEP)
    height = _whole("height", payload.get("height", 512), SIZE_MIN, SIZE_MAX, SIZE_STEP)
    steps = _whole("steps", payload.get("steps", 10), STEPS_MIN, STEPS_MAX)
    seed = _whole("seed", payload.get("seed", 1), 0, SEED_MAX)
    repeats = _whole("repeats", payload.get("repeats", 1), 1, REPEATS_MAX)
    kinds = parse_kinds(payload.get("kinds", list(KINDS)))
    explicit: tuple[GenerationSettings, ...] | None = None
    raw = payload.get("candidates")
    if raw is not None:
        if not isinstance(raw, list) or not raw:
            raise SettingsError("candidates", raw, "a non-empty list of settings objects")
        parsed: list[GenerationSettings] = []
        for index, item in enumerate(raw):
            try:
                settings = from_dict(item, host, base=base)
                if validate is not None:
                    validate(settings)
            except SettingsError as exc:
                raise SettingsError(f"candidates[{index}].{exc.field}", exc.value, exc.allowed) from None
            except ValueError as exc:
                raise SettingsError(f"candidates[{index}]", item, str(exc)) from None
            settings = replace(settings, enabled=True)
            if settings not in parsed:
                parsed.append(settings)
        explicit = tuple(parsed)
    return BenchRequest(prompt, width, height, steps, seed, kinds, explicit, repeats)


def explicit_candidates(settings: Sequence[GenerationSettings], base: GenerationSettings) -> list[BenchCandidate]:
    """Candidates for a list given through the API, labelled by what differs from ``base``."""
    baseline = replace(base, enabled=True)
    return [BenchCandidate(change_label(baseline, s), s) for s in settings]
