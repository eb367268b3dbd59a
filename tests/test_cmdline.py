"""lib_optim.launch.cmdline against the real argparse, built from the same flag tables the hosts' parsers produce."""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

import pytest

from lib_optim.host_specs.kinds import HostKind
from lib_optim.launch.cmdline import environment_command_line, parse_args, split_command_line
from lib_optim.launch.flagspec import FlagSpec
from lib_optim.launch.flagtables import FLAGS

A1111, FORGE, PREVIOUS = HostKind.A1111, HostKind.FORGE, HostKind.FORGE_PREVIOUS
HOSTS = (A1111, FORGE, PREVIOUS)


class ArgparseError(Exception):
    pass


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and exit(2)
        raise ArgparseError(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise ArgparseError(message or f"exit {status}")


_TYPES = {"int": int, "float": float, "str": str, "path": str}


def build_parser(host: HostKind) -> argparse.ArgumentParser:
    """An argparse parser with the host's flags (no mutually exclusive groups: the checker reports those)."""
    parser = _RaisingParser(add_help=False, argument_default=argparse.SUPPRESS, allow_abbrev=True)
    for spec in FLAGS[host]:
        kwargs: dict[str, Any] = {"dest": spec.dest}
        if spec.takes_value == "none":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _TYPES[spec.value_type]
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
            if spec.takes_value == "optional":
                kwargs["nargs"] = "?"
                kwargs["const"] = spec.const
            elif spec.takes_value == "many":
                kwargs["nargs"] = "+"
        parser.add_argument(spec.option, *spec.aliases, **kwargs)
    return parser


_PARSERS = {host: build_parser(host) for host in HOSTS}


def run_argparse(host: HostKind, argv: Sequence[str]) -> tuple[set[str] | None, str | None]:
    """(dests argparse set, None) or (None, argparse's error message)."""
    try:
        namespace = _PARSERS[host].parse_args(list(argv))
    except ArgparseError as exc:
        return None, str(exc)
    return set(vars(namespace)), None


def run_ours(host: HostKind, argv: Sequence[str]) -> tuple[set[str], bool]:
    """(dests we accepted, whether we report anything argparse would exit on)."""
    parsed = parse_args(list(argv), host)
    dests = {f.spec.dest for f in parsed.known if f.spec is not None}
    return dests, bool(parsed.unknown or parsed.problems)


def assert_same_as_argparse(host: HostKind, argv: Sequence[str]) -> None:
    dests, error = run_argparse(host, argv)
    ours, we_error = run_ours(host, argv)
    assert we_error == (error is not None), f"{host.value} {argv}: argparse says {error!r}, we say error={we_error}"
    if error is None:
        assert ours == dests, f"{host.value} {argv}"


# --- named command lines -------------------------------------------------------------------------------

ACCEPTED: list[tuple[HostKind, list[str], dict[str, str | None]]] = [
    # (host, argv, {canonical option: value})
    (A1111, ["--lowvr"], {"--lowvram": None}),
    (A1111, ["--medvram"], {"--medvram": None}),  # exact match, although it is a prefix of --medvram-sdxl
    (A1111, ["--precision=full"], {"--precision": "full"}),
    (A1111, ["--precision", "half"], {"--precision": "half"}),
    (FORGE, ["--precision", "half"], {"--precision": "half"}),
    (PREVIOUS, ["--precision", "autocast"], {"--precision": "autocast"}),
    (A1111, ["--prec=full"], {"--precision": "full"}),
    (A1111, ["--use-cpu", "all", "sd"], {"--use-cpu": "all sd"}),
    (A1111, ["--use-cpu", "all", "sd", "--no-half"], {"--use-cpu": "all sd", "--no-half": None}),
    (A1111, ["--use-cpu=all", "--no-half"], {"--use-cpu": "all", "--no-half": None}),
    (FORGE, ["--directml"], {"--directml": None}),
    (FORGE, ["--directml", "1"], {"--directml": "1"}),
    (FORGE, ["--directml=0", "--attention-split"], {"--directml": "0", "--attention-split": None}),
    (PREVIOUS, ["--directml", "--always-cpu"], {"--directml": None, "--always-cpu": None}),
    (A1111, ["--device-id", "abc"], {"--device-id": "abc"}),  # type=str on A1111 (modules/cmd_args.py:106)
    (FORGE, ["--gpu-device-id", "1"], {"--gpu-device-id": "1"}),
    (A1111, ["--port", "-5"], {"--port": "-5"}),  # a negative number is a value, not an option
    (A1111, ["--sub-quad-chunk-threshold", "-1"], {"--sub-quad-chunk-threshold": "-1"}),
    (PREVIOUS, ["--web-upload-size", "-.5"], {"--web-upload-size": "-.5"}),
    (A1111, ["--ckpt", "-"], {"--ckpt": "-"}),
    (A1111, ["--ckpt", "-my model.safetensors"], {"--ckpt": "-my model.safetensors"}),  # a space: a value
    (A1111, ["--ckpt=--weird"], {"--ckpt": "--weird"}),
    (A1111, ["-f", "--listen"], {"-f": None, "--listen": None}),
    (A1111, [], {}),
]


@pytest.mark.parametrize(("host", "argv", "expected"), ACCEPTED, ids=str)
def test_accepted_like_argparse(host: HostKind, argv: list[str], expected: dict[str, str | None]) -> None:
    dests, error = run_argparse(host, argv)
    assert error is None
    parsed = parse_args(argv, host)
    assert not parsed.unknown
    assert not parsed.problems
    assert {o: parsed.value(o) for o in parsed.options()} == expected
    assert {f.spec.dest for f in parsed.known if f.spec} == dests


REJECTED: list[tuple[HostKind, list[str], str, str]] = [
    # (host, argv, our problem kind or "unknown", a piece of argparse's message)
    (A1111, ["--medvr"], "ambiguous", "ambiguous option"),
    (A1111, ["--medvr=1"], "ambiguous", "ambiguous option"),
    (A1111, ["--opt-sdp"], "ambiguous", "ambiguous option"),
    (FORGE, ["--attention"], "ambiguous", "ambiguous option"),
    (PREVIOUS, ["--precision", "half"], "bad-choice", "invalid choice"),  # previous: full/autocast only
    (A1111, ["--precision", "double"], "bad-choice", "invalid choice"),
    (A1111, ["--precision"], "missing-value", "expected one argument"),
    (A1111, ["--ckpt"], "missing-value", "expected one argument"),
    (A1111, ["--xformers", "--ckpt"], "missing-value", "expected one argument"),
    (A1111, ["--ckpt", "--xformers"], "missing-value", "expected one argument"),
    (A1111, ["--ckpt", "-x"], "missing-value", "expected one argument"),
    (A1111, ["--port", "-1e5"], "missing-value", "expected one argument"),  # not a negative number to argparse
    (PREVIOUS, ["--web-upload-size", "-inf"], "missing-value", "expected one argument"),
    (A1111, ["--use-cpu=all", "sd"], "stray-argument", "unrecognized arguments: sd"),  # "=" gives one value
    (A1111, ["--use-cpu"], "missing-value", "expected at least one argument"),
    (A1111, ["--use-cpu", "--no-half"], "missing-value", "expected at least one argument"),
    (FORGE, ["--directml", "abc"], "bad-type", "invalid int value"),
    (FORGE, ["--directml=abc"], "bad-type", "invalid int value"),
    (FORGE, ["--gpu-device-id", "abc"], "bad-type", "invalid int value"),
    (A1111, ["--port", "80.5"], "bad-type", "invalid int value"),
    (PREVIOUS, ["--web-upload-size", "big"], "bad-type", "invalid float value"),
    (A1111, ["--listen=yes"], "bad-type", "ignored explicit argument"),
    (A1111, ["--lowvram", "-5"], "stray-argument", "unrecognized arguments"),
    (A1111, ["model.ckpt"], "stray-argument", "unrecognized arguments"),
    (A1111, ["--listen", "--", "--port", "80"], "stray-argument", "unrecognized arguments"),
    (FORGE, ["--xformers", "--", "words", "after"], "stray-argument", "unrecognized arguments"),
    (A1111, ["--xformers", "--"], "stray-argument", "unrecognized arguments: --"),
    (A1111, ["--all-in-fp32"], "unknown", "unrecognized arguments"),
    (A1111, ["--directml"], "unknown", "unrecognized arguments"),
    (A1111, ["--use-cuda-dsa"], "unknown", "unrecognized arguments"),
    (FORGE, ["--use-cuda-dsa"], "unknown", "unrecognized arguments"),
    (PREVIOUS, ["--use-cuda-dsa"], "unknown", "unrecognized arguments"),
    (FORGE, ["--opt-channelslast", "--force-channels-last"], "unknown", "unrecognized arguments"),
    (A1111, ["--no-such-flag=3"], "unknown", "unrecognized arguments"),
]


@pytest.mark.parametrize(("host", "argv", "kind", "argparse_says"), REJECTED, ids=str)
def test_rejected_like_argparse(host: HostKind, argv: list[str], kind: str, argparse_says: str) -> None:
    _, error = run_argparse(host, argv)
    assert error is not None and argparse_says in error
    parsed = parse_args(argv, host)
    if kind == "unknown":
        assert parsed.unknown and not parsed.problems
    else:
        assert kind in {p.kind for p in parsed.problems}, parsed.problems


def test_every_problem_is_reported_not_only_the_first() -> None:
    parsed = parse_args(["--medvr", "--bogus", "--precision", "double", "--ckpt"], A1111)
    assert [f.option for f in parsed.unknown] == ["--bogus"]
    assert [p.kind for p in parsed.problems] == ["ambiguous", "bad-choice", "missing-value"]
    assert [p.token for p in parsed.problems] == ["--medvr", "--precision", "--ckpt"]


def test_ambiguous_names_the_candidates() -> None:
    (problem,) = parse_args(["--medvr"], A1111).problems
    assert "--medvram" in problem.detail and "--medvram-sdxl" in problem.detail


def test_abbreviation_resolves_to_canonical_option() -> None:
    parsed = parse_args(["--lowvr", "--prec", "full"], A1111)
    (low, prec) = parsed.known
    assert (low.token, low.option, low.index) == ("--lowvr", "--lowvram", 0)
    assert (prec.token, prec.option, prec.value, prec.index) == ("--prec", "--precision", "full", 1)
    assert parsed.has("--lowvram") and parsed.value("--precision") == "full"


def test_last_occurrence_wins() -> None:
    parsed = parse_args(["--precision", "full", "--precision=autocast"], A1111)
    assert parsed.value("--precision") == "autocast"
    assert parsed.options() == ["--precision"]
    assert _PARSERS[A1111].parse_args(["--precision", "full", "--precision=autocast"]).precision == "autocast"


def test_directml_without_value_uses_const() -> None:
    assert _PARSERS[FORGE].parse_args(["--directml"]).directml == -1
    flag = parse_args(["--directml"], FORGE).given("--directml")
    assert flag is not None and flag.value is None and flag.spec is not None and flag.spec.const == "-1"


def test_string_command_line_with_quotes() -> None:
    text = "--ckpt \"my model.safetensors\" --xformers --gradio-auth 'u:p w'"
    tokens = split_command_line(text)
    assert tokens == ["--ckpt", "my model.safetensors", "--xformers", "--gradio-auth", "u:p w"]
    parsed = parse_args(text, A1111)
    assert not parsed.unknown and not parsed.problems
    assert parsed.value("--ckpt") == "my model.safetensors"
    assert parsed.value("--gradio-auth") == "u:p w"
    assert parsed.argv == tuple(tokens)
    assert _PARSERS[A1111].parse_args(tokens).ckpt == "my model.safetensors"


def test_unquoted_space_in_path_is_a_stray_word() -> None:
    parsed = parse_args("--ckpt my model.safetensors", A1111)
    assert parsed.value("--ckpt") == "my"
    assert [(p.kind, p.token) for p in parsed.problems] == [("stray-argument", "model.safetensors")]
    _, error = run_argparse(A1111, split_command_line("--ckpt my model.safetensors"))
    assert error is not None and "unrecognized arguments" in error


def test_environment_command_line() -> None:
    assert environment_command_line({}) == []
    assert environment_command_line({"COMMANDLINE_ARGS": "   "}) == []
    assert environment_command_line({"COMMANDLINE_ARGS": "--xformers --ckpt 'a b'"}) == ["--xformers", "--ckpt", "a b"]


def test_extra_flags_from_extensions_are_known() -> None:
    extra = FlagSpec("--optim-profile", (), "optim_profile", "one", "str", None, None, None, "ext", "x:1", "")
    assert parse_args(["--optim-profile", "fast"], A1111).unknown
    parsed = parse_args(["--optim-profile", "fast"], A1111, [extra])
    assert parsed.value("--optim-profile") == "fast" and not parsed.unknown


# --- property: random token lists from the real option strings --------------------------------------------

_VALUES = ["all", "sd", "full", "half", "autocast", "1", "0", "7860", "-3", "-.5", "2.5", "abc", "x/y.ckpt", "-", "-q"]


def _random_argv(rng: random.Random, specs: Sequence[FlagSpec]) -> list[str]:
    tokens: list[str] = []
    for _ in range(rng.randint(0, 6)):
        roll = rng.random()
        if roll < 0.08:
            tokens.append("--no-such-" + rng.choice(["flag", "thing"]))
            continue
        if roll < 0.16:
            tokens.append(rng.choice(_VALUES))  # a value where a flag belongs, or a value for the previous flag
            continue
        # bias towards the flags whose parsing has the most rules: optional/several values, choices, numbers
        tricky = [
            s for s in specs if s.takes_value in ("optional", "many") or s.choices or s.value_type in ("int", "float")
        ]
        spec = rng.choice(tricky if rng.random() < 0.4 else specs)
        option = rng.choice([o for o in (spec.option, *spec.aliases) if o not in ("-h", "--help")])
        if option.startswith("--") and rng.random() < 0.3:
            option = option[: rng.randint(3, len(option))]  # an abbreviation: unique, ambiguous or exact
        value_pool = list(spec.choices or ()) + _VALUES
        if spec.takes_value != "none" and rng.random() < 0.3:
            tokens.append(f"{option}={rng.choice(value_pool)}")
        else:
            tokens.append(option)
        if spec.takes_value == "none":
            continue
        count = {"one": 1, "optional": rng.randint(0, 1), "many": rng.randint(1, 3)}[spec.takes_value]
        if rng.random() < 0.1:
            count = 0  # a missing value
        tokens.extend(rng.choice(value_pool) for _ in range(count))
    return tokens


@pytest.mark.parametrize("host", HOSTS, ids=lambda h: h.value)
def test_random_command_lines_match_argparse(host: HostKind) -> None:
    rng = random.Random(f"cmdline-{host.value}")
    specs = [s for s in FLAGS[host] if s.dest != "help"]
    accepted = rejected = 0
    for _ in range(800):
        argv = _random_argv(rng, specs)
        assert_same_as_argparse(host, argv)
        if run_argparse(host, argv)[1] is None:
            accepted += 1
        else:
            rejected += 1
    # the generator must exercise both outcomes
    assert accepted > 50 and rejected > 50, (accepted, rejected)
