"""What one regional-compile application did (its telemetry): counts, seconds, and why it fell back or recompiled."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_RECOMPILE_REASONS = 5  # per application, in the telemetry


@dataclass
class CompileStats:
    """What one application did. Seconds are from the compiler's clock.

    ``compiles``: dynamo frames compiled during this application (a graph break adds frames);
    ``graphs``: graphs dynamo produced (``shared_graphs`` of them reused another block's compiled code,
    torch < 2.5); ``graph_breaks``: dynamo's graph breaks (0 when every block is one graph);
    ``process_compiles``: frames compiled by this compiler in this process, this application included.
    ``compile_seconds``: wall time of the calls that triggered a compile (compile plus that run);
    ``run_seconds``: the other compiled calls; ``recompile_reasons``: the guards whose failure made a block
    compile again (dynamo's words, the first few).
    """

    mode: str = "off"
    key: str = ""
    blocks: int = 0
    shared: bool = False
    calls: int = 0
    eager_calls: int = 0
    compiles: int = 0
    graphs: int = 0
    process_compiles: int = 0
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    eager_frames: int = 0
    graph_breaks: int = 0
    shared_graphs: int = 0
    interrupted: bool = False
    limit_hits: int = 0
    rebuilt_for_weights: int = 0
    fell_back: bool = False
    fallback_reason: str = ""
    recompile_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compile_seconds"] = round(self.compile_seconds, 3)
        data["run_seconds"] = round(self.run_seconds, 3)
        return data
