"""Who reads an environment variable, from the generated table :mod:`lib_optim.launch.envtables`.

The table (``tools/gen_envtables.py``) records, for the variable families the checker covers (:data:`FAMILIES`),
the names that torch 2.1.2, 2.3.1, 2.9.0 and the current wheel read (Python reads and names present in its
libraries), the names xformers reads, each host's own reads and writes, and the documented variables of CUDA,
cuDNN, NCCL, NVIDIA's tools, glibc's malloc and jemalloc. This module answers from it:

* :func:`unread` — a set variable in a family that nothing here reads (``no-effect-env``), with the close real
  names ("did you mean") and what does the job when the intent is clear (TF32, a memory cap, compile mode);
* :func:`at_default` — a read variable set to the value its reader uses when it is unset (``redundant-env``).

Variables the hand-written rows of :mod:`lib_optim.launch.env_rows` know are left to them: a row is the
researched word on its variable.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache

from lib_optim.host_specs import HostKind, host_spec
from lib_optim.launch import envtables
from lib_optim.launch.env_model import EnvContext, env_hosts, host_torch, torch_text

FAMILIES: tuple[str, ...] = envtables.FAMILIES
TABLE = "lib_optim/launch/envtables.py"


def in_family(name: str) -> bool:
    """An upper-case name in one of the checked families (Linux reads names case-sensitively)."""
    return name == name.upper() and any(name.startswith(f) and len(name) > len(f) for f in FAMILIES)


def _match(table: Mapping[str, object], name: str) -> list[str]:
    """The keys of ``table`` that are ``name`` or a prefix pattern (``X_*``) covering it."""
    return [key for key in table if key == name or (key.endswith("*") and name.startswith(key[:-1]))]


@dataclass(frozen=True)
class Readers:
    """Everything in the table that reads one name."""

    torch: dict[str, str]  # torch release → where
    xformers: dict[str, str]  # xformers tag → where
    hosts: dict[str, str]  # host kind value → where
    documented: tuple[str, str] | None  # (reader, citation)

    def other_than_torch(self, host: HostKind) -> bool:
        """Read by xformers, by ``host`` itself or by a documented reader."""
        return bool(self.xformers) or host.value in self.hosts or self.documented is not None


def readers(name: str) -> Readers:
    torch: dict[str, str] = {}
    for key in _match(envtables.TORCH_READS, name):
        for release, where in envtables.TORCH_READS[key].items():
            torch.setdefault(release, where)
    xformers = dict(envtables.XFORMERS_READS.get(name, {}))
    hosts = dict(envtables.HOST_READS.get(name, {}))
    documented_keys = _match(envtables.DOCUMENTED, name)
    documented = None
    if documented_keys:
        reader, citation, _default = envtables.DOCUMENTED[documented_keys[0]]
        documented = (reader, citation)
    return Readers(torch, xformers, hosts, documented)


def scanned_releases() -> tuple[str, ...]:
    return tuple(envtables.TORCH_SOURCES)


def release_of(version: str | None) -> str | None:
    """The scanned torch release that stands for ``version`` ("2.1.2+cu121" → "2.1.2"): the same release, else
    the same major.minor; None when no scanned release is close."""
    if not version:
        return None
    plain = version.split("+", 1)[0]
    if plain in envtables.TORCH_SOURCES:
        return plain
    minor = ".".join(plain.split(".")[:2])
    same = [r for r in envtables.TORCH_SOURCES if ".".join(r.split(".")[:2]) == minor]
    return same[0] if same else None


def torch_in_use(ctx: EnvContext) -> tuple[str | None, bool]:
    """(the scanned release for the torch in use, whether its scan can prove a name absent).

    A scan proves absence when it had the CUDA libraries, or when it is the very build in use (a CPU-only
    wheel lacks CUDA libraries, and so does a CPU-only torch).
    """
    version = ctx.facts.torch_version or host_torch(ctx.host)
    release = release_of(version)
    if release is None:
        return None, False
    source = envtables.TORCH_SOURCES[release]
    return release, (bool(source["cuda_libraries"]) and _flavour(version) in ("", "cu")) or version == source["version"]


def _flavour(version: str | None) -> str:
    """The build a version names: "cu" (2.1.2+cu121), "cpu", "rocm", "xpu", or "" (no local tag: PyPI's Linux
    wheels are CUDA builds)."""
    local = (version or "").partition("+")[2]
    return re.sub(r"[0-9.]+$", "", local.split(".")[0]) if local else ""


def scanned_build(ctx: EnvContext) -> bool:
    """The torch in use is a kind of build the table read (CUDA or CPU; not ROCm, XPU or a Mac's)."""
    return _flavour(ctx.facts.torch_version) in ("", "cu", "cpu") and not ctx.facts.mps_available


def torch_ignores(name: str, ctx: EnvContext) -> bool:
    """The torch in use provably does not read ``name``, and neither does anything else here."""
    release, proves = torch_in_use(ctx)
    found = readers(name)
    return proves and release is not None and release not in found.torch and not found.other_than_torch(ctx.host)


def _releases_text(releases: list[str]) -> str:
    return ", ".join(releases[:-1]) + (" and " if len(releases) > 1 else "") + releases[-1]


def _where(readers: Readers) -> str:
    """Where the name is read, in one short clause."""
    if readers.torch:
        release, where = next(iter(readers.torch.items()))
        kind = "present in" if where.endswith((".so", ".so.1")) or ".so." in where else "read at"
        return f"torch {release}: {kind} {where}"
    if readers.xformers:
        tag, where = next(iter(readers.xformers.items()))
        return f"xformers {tag}: {where}"
    if readers.hosts:
        host, where = next(iter(readers.hosts.items()))
        return f"{host}: {where}"
    return readers.documented[1] if readers.documented else ""


# --- did you mean -------------------------------------------------------------------------------------


@cache
def known_names() -> tuple[str, ...]:
    """Every exact name something reads (prefix patterns left out)."""
    names = set(envtables.TORCH_READS) | set(envtables.XFORMERS_READS) | set(envtables.DOCUMENTED)
    names |= {n for n in envtables.HOST_READS if in_family(n)}
    return tuple(sorted(n for n in names if not n.endswith("*")))


def suggestions(name: str, pool: tuple[str, ...] | None = None, cutoff: float = 0.85) -> list[str]:
    """Real names close to ``name`` (difflib; from ``pool``, else every known name), best first."""
    return difflib.get_close_matches(name, known_names() if pool is None else pool, n=2, cutoff=cutoff)


def names_read_here(host: HostKind, release: str | None) -> tuple[str, ...]:
    """The exact names read with this host and torch release (every torch release when it is unknown)."""
    if release is None:
        return known_names()
    names = {n for n, where in envtables.TORCH_READS.items() if release in where}
    names |= set(envtables.XFORMERS_READS) | set(envtables.DOCUMENTED)
    names |= {n for n, where in envtables.HOST_READS.items() if host.value in where and in_family(n)}
    return tuple(sorted(n for n in names if not n.endswith("*")))


# --- what does the job --------------------------------------------------------------------------------


def _tf32_hint(host: HostKind) -> tuple[str, str]:
    if host is HostKind.A1111:
        done = "A1111 already allows TF32 for matrix multiplies and cuDNN at start-up (modules/devices.py:101-110)."
        fix = "Remove it: TF32 is on already."
    else:
        done = (
            f"{host.display_name} does not switch TF32 on (no flag or setting does; neither does this extension); "
            "the one variable torch reads for it is TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (float32 matrix "
            "multiplies in cuBLAS; cuDNN convolutions allow TF32 by default)."
        )
        fix = "Remove it; to allow TF32 set TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 instead."
    return (
        "TF32 is a Python setting: torch.backends.cuda.matmul.allow_tf32 = True or "
        f"torch.set_float32_matmul_precision('high'). {done}",
        fix,
    )


def _memory_hint(host: HostKind) -> tuple[str, str]:
    spec = host_spec(host)
    if host is HostKind.A1111:
        ours = "--medvram or --lowvram keep less of the model on the GPU"
    elif spec.supports_inference_memory:
        ours = "this extension's 'Inference memory (MB)' (and Forge f2's 'GPU Weights') keep GPU memory free"
    else:
        ours = "the host's own memory flags decide how much of the model stays on the GPU"
    return (
        "torch reads no variable that caps its GPU memory: the cap is torch.cuda.set_per_process_memory_fraction() "
        "in Python. PYTORCH_CUDA_ALLOC_CONF shapes the caching allocator (e.g. expandable_segments:True, "
        f"garbage_collection_threshold:0.6), and {ours}.",
        "Remove it; use PYTORCH_CUDA_ALLOC_CONF or the memory settings named above.",
    )


def _compile_hint(_host: HostKind) -> tuple[str, str]:
    return (
        "torch.compile's mode is an argument of the call, not a variable: this extension compiles the UNet's "
        "blocks with 'Compile UNet blocks' (off, on, max-autotune; the per-generation field `compile`), and "
        "TorchInductor's own settings are TORCHINDUCTOR_* variables.",
        "Remove it; choose 'Compile UNet blocks' in the Optim accordion (or `compile` over the API).",
    )


def _benchmark_hint(_host: HostKind) -> tuple[str, str]:
    return (
        "cuDNN benchmarking is the Python setting torch.backends.cudnn.benchmark, which only code can change.",
        "Remove it; it changes nothing.",
    )


# (pattern on the name, hint) — the first that matches is the intent
INTENTS: tuple[tuple[re.Pattern[str], Callable[[HostKind], tuple[str, str]]], ...] = (
    (re.compile(r"TF32"), _tf32_hint),
    (re.compile(r"FRACTION|MEM(ORY)?_(LIMIT|CAP|MAX|RATIO)|MAX_(GPU_)?MEM|VRAM"), _memory_hint),
    (re.compile(r"COMPILE|INDUCTOR|DYNAMO"), _compile_hint),
    (re.compile(r"BENCHMARK"), _benchmark_hint),
)


def intent(name: str, host: HostKind) -> tuple[str, str] | None:
    """(what does the job, the fix) when the name says what it was meant for."""
    for pattern, hint in INTENTS:
        if pattern.search(name):
            return hint(host)
    return None


# --- the two questions the checker asks ----------------------------------------------------------------


@dataclass(frozen=True)
class EnvVerdict:
    subject: str
    message: str
    fix: str


def covered_hosts() -> tuple[str, ...]:
    """The hosts whose own reads the table holds."""
    return tuple(envtables.HOST_REVISIONS)


def _set_in_process(name: str, host: HostKind, release: str | None) -> bool:
    """The host or torch sets it itself: inside the WebUI the user's value cannot be told from theirs."""
    if host.value in envtables.HOST_WRITES.get(name, {}):
        return True
    return release is not None and release in envtables.TORCH_WRITES.get(name, {})


def _nothing_reads(name: str) -> str:
    return (
        f"Nothing reads {name}: it is in none of torch {_releases_text(list(scanned_releases()))} (their Python "
        f"files and libraries), xformers, the code of the {len(covered_hosts())} hosts, or the documented variables of "
        f"CUDA, cuDNN, NCCL, NVIDIA's tools and glibc ({TABLE})."
    )


def _not_here(name: str, ctx: EnvContext, found: Readers, release: str | None, proves: bool) -> str | None:
    """Why ``name`` does nothing on this host and torch though something else reads it, or None."""
    if found.other_than_torch(ctx.host):
        return None
    if not found.torch:  # read only by other hosts
        return f"{ctx.host.display_name} does not read {name}; only {', '.join(found.hosts)} do ({_where(found)})."
    if not proves or release is None or release in found.torch:
        return None
    return (
        f"torch {torch_text(ctx)} does not read {name} (it is in none of its Python files or libraries); "
        f"torch {_releases_text(list(found.torch))} do ({_where(found)})."
    )


def unread(ctx: EnvContext, skip: Callable[[str], bool]) -> Iterator[EnvVerdict]:
    """``no-effect-env``: set variables in a family that nothing reads here (``skip``: the rows' names)."""
    if ctx.host.value not in covered_hosts() or not scanned_build(ctx):
        return  # a ROCm, XPU or Mac torch reads names of its own that no scanned file has
    release, proves = torch_in_use(ctx)
    for name in ctx.env:
        if not in_family(name) or skip(name) or _set_in_process(name, ctx.host, release):
            continue
        found = readers(name)
        if not (found.torch or found.hosts or found.xformers or found.documented):
            yield _with_hints(name, _nothing_reads(name), ctx.host, names_read_here(ctx.host, release))
            continue
        message = _not_here(name, ctx, found, release, proves)
        if message is not None:
            pool = tuple(n for n, where in envtables.TORCH_READS.items() if release in where) if release else ()
            yield _with_hints(name, message, ctx.host, pool, "Remove it, or use a torch that reads it.")


def _with_hints(
    name: str, message: str, host: HostKind, pool: tuple[str, ...], otherwise: str = "Remove it."
) -> EnvVerdict:
    """The finding, with the close real names from ``pool`` and what does the job."""
    fixes: list[str] = []
    hint = intent(name, host)
    # With a clear intent only a near-certain typo is worth naming (TORCH_COMPILE_MODE is not TORCH_COMPILE_DEBUG).
    close = [s for s in suggestions(name, pool, 0.85 if hint is None else 0.93) if s != name]
    if close:
        message += f" Did you mean {' or '.join(close)}?"
        fixes.append(f"Rename it to {close[0]} if that is what you meant.")
    if hint is not None:
        message += " " + hint[0]
        fixes.append(hint[1])
    return EnvVerdict(name, message, " ".join(fixes) or otherwise)


def _default_of(name: str, ctx: EnvContext, release: str | None) -> tuple[str, str] | None:
    """(default, whose) when the readers here agree on the value they use when ``name`` is unset: a documented
    default, or the literal default of every Python read of the torch (or xformers) in use."""
    found = readers(name)
    if ctx.host.value in found.hosts:
        return None  # the host's own reads have no recorded default
    defaults: dict[str, str] = {}  # whose → default
    for key in _match(envtables.DOCUMENTED, name):
        reader, citation, default = envtables.DOCUMENTED[key]
        if default is None:
            return None
        defaults[f"{reader} ({citation})"] = default
    if release is not None and release in found.torch:
        torch_default = envtables.TORCH_DEFAULTS.get(name, {}).get(release)
        if torch_default is not None:
            defaults[f"torch {torch_text(ctx)}, at {found.torch[release]}"] = torch_default
        elif not defaults:
            return None  # a C++ reader, or Python reads without one literal default, and nothing documented
    tag = envtables.XFORMERS_HOST_TAGS.get(ctx.host.value, "")
    if tag in found.xformers:
        xformers_default = envtables.XFORMERS_DEFAULTS.get(name, {}).get(tag)
        if xformers_default is None:
            return None
        defaults[f"xformers {tag}, at {found.xformers[tag]}"] = xformers_default
    if len(set(defaults.values())) != 1:
        return None
    return next(iter(defaults.values())), "; ".join(defaults)


def at_default(ctx: EnvContext, skip: Callable[[str], bool]) -> Iterator[EnvVerdict]:
    """``redundant-env``: read variables set to the value their readers use when they are unset."""
    if ctx.host.value not in covered_hosts():
        return
    release, _proves = torch_in_use(ctx)
    for name, value in ctx.env.items():
        if not in_family(name) or skip(name) or _set_in_process(name, ctx.host, release):
            continue
        default = _default_of(name, ctx, release)
        if default is None or value.strip() != default[0]:
            continue
        yield EnvVerdict(
            name,
            f"{name}={value.strip()} is what its readers use when it is unset: {default[1]}. It changes nothing.",
            "Remove it.",
        )


# --- what the documentation says about the table -------------------------------------------------------


def families_text() -> str:
    return ", ".join(f"`{f}`" for f in FAMILIES)


def torch_releases_text() -> str:
    return _releases_text(list(scanned_releases()))


def sources_markdown() -> str:
    """The families and the sources of the generated table, for docs/rules.md (``rules --env``)."""
    lines = [
        f"**Every other variable in the families {families_text()}** is judged from a table generated from "
        f"the sources (`{TABLE}`, made by `tools/gen_envtables.py` on {envtables.GENERATED_ON}): one that "
        'nothing reads is `no-effect-env` (with "did you mean" when a real name is close, and what does the '
        "job for TF32, a GPU memory cap or a compile mode), one that the host's torch does not read while "
        "another torch does is `no-effect-env` too, and one set to the value its readers use when it is unset is "
        "`redundant-env`. Variables the host or torch set themselves are left alone. The table was read from:",
        "",
    ]
    for release, info in envtables.TORCH_SOURCES.items():
        hosts = [h.display_name for h in env_hosts() if host_torch(h) == release]
        libs = "with its CUDA libraries" if info["cuda_libraries"] else "a CPU-only build, without CUDA libraries"
        users = f" — {', '.join(hosts)}" if hosts else " — the current wheel"
        lines.append(
            f"- torch {info['version']} (git {str(info['git_version'])[:8]}), {libs}: its Python files (reads "
            f"with a literal name, and the literal default) and the strings of its libraries{users}."
        )
    tags = ", ".join(f"{tag} ({why})" for tag, why in envtables.XFORMERS_TAGS.items())
    lines.append(f"- xformers {tags}: the package's Python files (no host venv has xformers installed).")
    revisions = "; ".join(f"{host}: {label}" for host, label in envtables.HOST_REVISIONS.items())
    lines.append(
        f"- The hosts' own reads and writes (every `*.py`, `webui.sh`, `webui-macos-env.sh`, `webui.bat`): {revisions}."
    )
    citations = sorted({citation for _reader, citation, _default in envtables.DOCUMENTED.values()})
    lines.append(f"- Documented readers ({len(envtables.DOCUMENTED)} names and prefixes): {'; '.join(citations)}.")
    lines += [
        "",
        'A name found in a library is *present in the binary* — C++ reads variables with `getenv("NAME")`, '
        "whose argument is such a string, but the method does not see the call; a variable missing from every "
        "file of a torch is read by nothing in it. A CPU-only wheel says nothing about names only CUDA "
        "libraries would read.",
    ]
    return "\n".join(lines)
