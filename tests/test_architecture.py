"""How lib_optim is put together: imports go one way, the core never reaches into the host glue, and one
registry entry is all a new attention backend needs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lib_optim"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def lib_optim_imports(path: Path) -> set[str]:
    """Every lib_optim module ``path`` imports — at module level or inside functions (a lazy import is still a
    dependency: the cycle between two modules that import each other lazily is still a cycle)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(owner(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lib_optim.hosts import common` imports the module lib_optim.hosts.common;
            # `from lib_optim.hosts import create_adapter` imports from the package lib_optim.hosts
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else owner(node.module))
    return {n for n in out if n.startswith("lib_optim") and n != module_name(path)}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): lib_optim_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_cycle_in_lib_optim() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_the_core_never_imports_the_host_glue() -> None:
    offenders = {
        name: sorted(d for d in deps if d.startswith("lib_optim.hosts"))
        for name, deps in import_graph().items()
        if not name.startswith("lib_optim.hosts")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_walk_sees_lazy_imports() -> None:
    # the test above is only as good as the graph: a function-level import counts
    graph = import_graph()
    assert "lib_optim.bench" in graph["lib_optim.cli"]  # imported inside cmd_bench
    assert "lib_optim.hosts.common" in graph["lib_optim.hosts.optim_tab"]


# --- the house: a small core at the top, each feature family a wing -----------------------------------------

TOP_LEVEL_LIMIT = 12


def wings() -> list[str]:
    return sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def test_the_top_level_is_a_small_core() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, f"{len(top)} modules at the top of lib_optim (at most {TOP_LEVEL_LIMIT}): {top}"


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in wings()) else None


def published(wing: str) -> set[str]:
    """What a wing's face lists in ``__all__`` (names, and the modules it publishes whole), read without importing."""
    tree = ast.parse((PACKAGE / wing / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return {elt.value for elt in ast.walk(node.value) if isinstance(elt, ast.Constant)}
    return set()


def reaches_inside(dep: str, mine: str | None) -> bool:
    wing = wing_of(dep)
    if wing in (None, mine) or dep.count(".") < 2:
        return False
    return dep.split(".")[2] not in published(wing)


def test_a_wing_is_entered_through_its_face() -> None:
    """A module imports its own wing's modules and the core freely, but another wing only through that wing's
    ``__init__`` (its face): ``from lib_optim.attention import Attention``, never ``lib_optim.attention.registry``
    (unless the face publishes that module whole in ``__all__``, as ``vae`` does ``tiling``).
    The host glue (hosts/) and the webui_user readers are wings too."""
    offenders = {}
    for name, deps in import_graph().items():
        mine = wing_of(name)
        inside = sorted(d for d in deps if reaches_inside(d, mine))
        if inside:
            offenders[name] = inside
    assert offenders == {}


def test_the_face_rule_sees_a_reach_inside() -> None:
    # the rule above is only as good as wing_of: a module of one wing naming another wing's module is caught
    assert wing_of("lib_optim.attention.registry") == "attention"
    assert wing_of("lib_optim.attention") == "attention"
    assert wing_of("lib_optim.settings") is None
    deps = {"lib_optim.attention.registry", "lib_optim.settings", "lib_optim.vae", "lib_optim.vae.tiling"}
    assert sorted(d for d in deps if reaches_inside(d, "launch")) == ["lib_optim.attention.registry"]
    assert not reaches_inside("lib_optim.attention.registry", "attention")


def test_every_face_export_resolves() -> None:
    # a face's lazy names (torch-heavy modules load on first use) must exist where they point
    pytest.importorskip("torch")
    import importlib

    for wing in wings():
        face = importlib.import_module(f"lib_optim.{wing}")
        for name in getattr(face, "__all__", ()):
            assert getattr(face, name) is not None, f"lib_optim.{wing}.{name}"


def test_importing_a_wing_face_stays_cheap() -> None:
    # the CLI's checker and doctor import faces; none of them may pull in torch
    import subprocess
    import sys

    code = (
        "import sys, lib_optim.attention, lib_optim.bench, lib_optim.launch, lib_optim.vae, lib_optim.compile, "
        "lib_optim.gpu, lib_optim.oom, lib_optim.host_specs, lib_optim.settings; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- a new attention backend is one registry entry ---------------------------------------------------------


@pytest.fixture
def fake_backend():
    """A backend registered for one test, as a new one (SageAttention, flash-attn…) would be: one entry with
    its memory model, speed, fallback rank, host bindings and an implementation."""
    torch = pytest.importorskip("torch")
    from lib_optim.attention import registry
    from lib_optim.attention.memory import lse_peak

    def implementation(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    name = registry.register(
        "fake-flash",
        "a fake O(N) kernel",
        aliases=("fakeflash",),
        memory=lse_peak,
        speed={"cpu": 0.5, "cuda": 0.5},  # faster than everything: auto must pick it
        frugal_rank=-1,  # more frugal than sub-quad: the OOM retry must pick it
        a1111=registry.A1111Optimizer("Fake flash", "--opt-fake-flash", 200, 7),
        forge=registry.ForgeFunctions("attention_fake", "fake_attention_single_head_spatial", None),
        implementation=implementation,
    )
    try:
        yield name
    finally:
        registry.unregister(name)


def test_a_registered_backend_is_everywhere(fake_backend) -> None:
    from types import SimpleNamespace

    from lib_optim.attention import planner
    from lib_optim.attention.registry import Attention
    from lib_optim.bench import attention as attention_bench
    from lib_optim.host_specs.kinds import HostKind
    from lib_optim.hosts.a1111 import A1111Adapter
    from lib_optim.hosts.forge import ForgeAdapter
    from lib_optim.oom import retry as fallback
    from lib_optim.settings import GenerationSettings, from_dict, json_schema

    # settings validation (its name and alias) and the JSON schema, on the hosts that bind it
    assert from_dict({"attention": "fakeflash"}, HostKind.A1111).attention is fake_backend
    assert fake_backend.value in json_schema(HostKind.FORGE)["properties"]["attention"]["enum"]
    assert fake_backend in Attention and Attention("fake-flash") is fake_backend
    # the adapters offer it (the UI's choices are the available ones) when the host has it
    sd_hijack = SimpleNamespace(optimizers=[SimpleNamespace(title=lambda: "Fake flash")], current_optimizer=None)
    shared = SimpleNamespace(opts=SimpleNamespace(data={}))
    a1111 = A1111Adapter(modules={"modules.sd_hijack": sd_hijack, "modules.shared": shared})
    assert fake_backend in a1111.available_attention()
    attention = SimpleNamespace(attention_function=None, attention_fake=lambda *a: None)
    forge = ForgeAdapter(modules={"backend.attention": attention}, cuda_available=lambda: False)
    assert fake_backend in forge.available_attention()
    # the planner ranks it by its entry
    choice = planner.choose_auto_attention([Attention.SDP, fake_backend], device="cpu")
    assert choice.attention is fake_backend
    # the out-of-memory retry steps to it
    step = fallback.next_frugal(
        GenerationSettings(enabled=True),
        available=[fake_backend],
        supports_inference_memory=False,
        current_attention=None,
    )
    assert step is not None and step.settings.attention is fake_backend
    # the command-line bench times it among the host backends, and auto may pick it there
    assert fake_backend in attention_bench.host_backends()
    result = attention_bench.run_bench(["tiny"], quick=True, repeats=1)
    assert {r.backend for r in result.rows} >= {"fake-flash", "sdp"}


# --- small rooms: no long function, no long hand-written module (issue 14 §5) ------------------------------

FUNCTION_LIMIT = 80  # lines, from ``def`` to the last line of the body
MODULE_LIMIT = 800  # lines
# A module whose first line or docstring says it is generated (lib_optim/launch/flagtables.py: "Generated by
# tools/gen_flagtables.py ... do not edit by hand") is data, not a room: its size follows the hosts.
GENERATED_MARKER = "generated by"
# Offenders that other work is splitting right now. The integrator empties this once those splits are merged;
# nothing may be added to it: a new long function or module fails the test below.
PENDING_SPLITS: frozenset[str] = frozenset()


def is_generated(text: str) -> bool:
    lines = text.strip().splitlines()
    docstring = ast.get_docstring(ast.parse(text)) or ""
    heads = [lines[0] if lines else "", docstring.strip().splitlines()[0] if docstring.strip() else ""]
    return any(GENERATED_MARKER in head.lower() for head in heads)


def oversized(text: str, name: str) -> list[str]:
    """``name`` when the module is too long, and ``name:qualified.function`` for each function that is."""
    if is_generated(text):
        return []
    found = [name] if len(text.splitlines()) > MODULE_LIMIT else []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualified = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = (child.end_lineno or child.lineno) - child.lineno + 1
                    if length > FUNCTION_LIMIT:
                        found.append(f"{name}:{qualified}")
                visit(child, qualified + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(text), "")
    return found


def all_oversized() -> set[str]:
    found: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        found.update(oversized(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()))
    return found


def test_functions_and_modules_stay_small() -> None:
    new = sorted(all_oversized() - PENDING_SPLITS)
    assert new == [], (
        f"over {FUNCTION_LIMIT} lines per function or {MODULE_LIMIT} per module: split them into functions or "
        f"modules that each hold one thing: {new}"
    )


def test_pending_splits_are_still_pending() -> None:
    # the allow-list only shrinks: an entry that is small now must leave it, so it cannot grow back unnoticed
    done = sorted(PENDING_SPLITS - all_oversized())
    assert done == [], f"no longer oversized, remove from PENDING_SPLITS: {done}"


def test_the_size_rule_sees_long_functions_and_skips_generated_modules() -> None:
    def function(name: str, lines: int, indent: str = "") -> str:
        return f"{indent}def {name}():\n" + "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))

    assert oversized(function("short", FUNCTION_LIMIT), "m.py") == []
    assert oversized(function("long", FUNCTION_LIMIT + 1), "m.py") == ["m.py:long"]
    assert oversized("class A:\n" + function("long", FUNCTION_LIMIT + 1, "    "), "m.py") == ["m.py:A.long"]
    assert oversized("x = 1\n" * (MODULE_LIMIT + 1), "m.py") == ["m.py"]
    generated = "# Generated by tools/gen_flagtables.py from the hosts' own argparse code\n" + "x = 1\n" * MODULE_LIMIT
    assert oversized(generated, "m.py") == []
    flagtables = (PACKAGE / "launch" / "flagtables.py").read_text(encoding="utf-8")
    assert is_generated(flagtables) and not is_generated((PACKAGE / "cli.py").read_text(encoding="utf-8"))
