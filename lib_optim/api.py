"""HTTP API: ``/optim/v1/*`` routes, and validation of our fields on ``/sdapi/v1/txt2img|img2img``.

Why validation sits in front of the host's route: the host runs every script hook inside
``try/except Exception: errors.report(...)`` (docs/hosts.md §1.5, §1.10), so an error raised
from our hook cannot fail the request — the image would be generated with the bad value silently ignored.
A route placed first in the app's route list checks ``alwayson_scripts.optim.args`` and answers 422 with a
message naming field, value and allowed values before the host does anything; otherwise it hands the
untouched request to the host's own route (which keeps its ``--api-auth`` dependency).

Only fastapi/starlette (dependencies of both hosts) are imported here, no host code.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import Body, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from lib_optim.host_specs import HostKind, checked_hosts, parse_host
from lib_optim.launch import (
    PROFILES,
    CheckInput,
    ProfileError,
    RuntimeFacts,
    exit_code,
    resolve,
    run_checks,
    split_command_line,
)
from lib_optim.log import get_logger
from lib_optim.settings import Allowed, SettingsError, from_script_args, json_schema

log = get_logger(__name__)

SCRIPT_KEY = "optim"  # the script's title, lower-cased: the host matches alwayson_scripts keys that way
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
PREFIX = "/optim/v1"


def parse_api_auth(value: str | None) -> dict[str, str]:
    """``user:pass,user2:pass2`` as the host parses ``--api-auth`` (docs/hosts.md §1.10)."""
    credentials: dict[str, str] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        user, _, password = item.partition(":")
        credentials[user] = password
    return credentials


def auth_dependency(credentials: Mapping[str, str]) -> Callable[..., bool]:
    """HTTP Basic check identical to the host's ``Api.auth`` (docs/hosts.md §1.10)."""

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008 - FastAPI idiom
        expected = credentials.get(given.username)
        if expected is not None and secrets.compare_digest(given.password, expected):
            return True
        raise HTTPException(
            status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
        )

    return check


def validation_error(
    body: Any,
    host: HostKind | None,
    validate: Callable[[Any], None] | None = None,
    allowed: Allowed | None = None,
) -> str | None:
    """The error message for our part of a generation request body, or None when it is fine (or absent).
    ``allowed``: the values this install accepts by field (e.g. the available attention backends), so the
    message lists only those."""
    if not isinstance(body, dict):
        return None
    scripts = body.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return None
    entry = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == SCRIPT_KEY), None)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        return f'[Optim] alwayson_scripts.optim: {entry!r} is not allowed; allowed: {{"args": [...]}}'
    args = entry.get("args")
    if args is None:
        return None
    if not isinstance(args, list):
        return f"[Optim] args: {args!r} is not allowed; allowed: a list — [{{...settings...}}] or positional values"
    try:
        settings = from_script_args(args, host, allowed=allowed)
        if validate is not None and settings.enabled:
            validate(settings)
    except (SettingsError, ValueError) as exc:
        return str(exc)
    return None


class _ValidatingRoute(BaseRoute):
    """Checks our args on the generation routes, then passes the request on unchanged."""

    def __init__(
        self,
        host: HostKind | None,
        validate: Callable[[Any], None] | None,
        available: Callable[[], Allowed] | None = None,
    ):
        self.host = host
        self.validate = validate
        self.available = available

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get("type") == "http" and scope.get("method") == "POST" and scope.get("path") in GENERATION_PATHS:
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        from starlette.routing import NoMatchFound

        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        error = None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None  # not JSON: the host's route answers that
        if body is not None:
            allowed = self.available() if self.available is not None else None
            error = validation_error(body, self.host, self.validate, allowed)
        if error is not None:
            log.warning("API request refused: %s", error)
            await JSONResponse({"detail": error, "error": "OptimSettingsError"}, status_code=422)(scope, receive, send)
            return

        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return dict(await receive())

        router = scope["app"].router
        for route in router.routes:
            if route is self:
                continue
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                await route.handle({**scope, **child_scope}, replay, send)
                return
        await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)


CHECK_KEYS = ("host", "args", "commandline", "env")


def parse_check_request(body: Any) -> tuple[str | None, list[str], str | None, dict[str, str]]:
    """``POST /optim/v1/check``'s body: (host, args, commandline, env), each checked for its type — a number
    where a string belongs is refused, never turned into the flag "5". :class:`SettingsError` names the field,
    the value and what is allowed."""
    if not isinstance(body, dict):
        raise SettingsError("request", body, "a JSON object with keys " + ", ".join(CHECK_KEYS))
    unknown = [k for k in body if k not in CHECK_KEYS]
    if unknown:
        raise SettingsError("request", unknown[0], "keys " + ", ".join(CHECK_KEYS))
    host = body.get("host")
    if host is not None and not isinstance(host, str):
        raise SettingsError("host", host, "a host name (string) or null")
    args = body.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SettingsError("args", args, "a list of strings (launch arguments)")
    commandline = body.get("commandline")
    if commandline is not None and not isinstance(commandline, str):
        raise SettingsError("commandline", commandline, "a string (as COMMANDLINE_ARGS) or null")
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise SettingsError("env", env, "an object of string names to string values")
    return host, list(args), commandline, dict(env)


def install_validation(
    app: FastAPI,
    host: HostKind | None,
    validate: Callable[[Any], None] | None = None,
    available: Callable[[], Allowed] | None = None,
) -> None:
    """Put the validating route first (once; a UI reload builds a new app, docs/hosts.md §1.11)."""
    routes = app.router.routes
    for existing in [r for r in routes if isinstance(r, _ValidatingRoute)]:
        routes.remove(existing)
    routes.insert(0, _ValidatingRoute(host, validate, available))


def register_routes(
    app: FastAPI,
    *,
    host: HostKind | None,
    status: Callable[[], dict[str, Any]],
    api_auth: str | None,
    facts: Callable[[], RuntimeFacts] | None = None,
    validate: Callable[[Any], None] | None = None,
    available: Callable[[], Allowed] | None = None,
    extra_routes: Sequence[tuple[str, Callable[..., Awaitable[Any] | Any], list[str]]] = (),
) -> None:
    """Add ``/optim/v1/*`` (with the host's ``--api-auth`` credentials when set) and request validation.
    ``available``: the values this install accepts by field, for error messages and the schema."""
    credentials = parse_api_auth(api_auth)
    dependencies = [Depends(auth_dependency(credentials))] if credentials else []
    for route in [r for r in app.router.routes if getattr(r, "path", "").startswith(PREFIX)]:
        app.router.routes.remove(route)

    def get_status() -> dict[str, Any]:
        return status()

    def post_check(body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008 - FastAPI idiom
        return _check_response(body, host, facts)

    def get_schema() -> dict[str, Any]:
        return json_schema(host, allowed=available() if available is not None else None)

    def get_profiles() -> list[dict[str, Any]]:
        return _profiles_listing()

    app.add_api_route(f"{PREFIX}/status", get_status, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/check", post_check, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/schema", get_schema, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/profiles", get_profiles, methods=["GET"], dependencies=dependencies)
    for path, endpoint, methods in extra_routes:
        app.add_api_route(f"{PREFIX}{path}", endpoint, methods=methods, dependencies=dependencies)
    install_validation(app, host, validate, available)


def _check_response(body: Any, host: HostKind | None, facts: Callable[[], RuntimeFacts] | None) -> dict[str, Any]:
    """``POST /check``: the checker's findings for the request's host (default: this one), flags and env."""
    try:
        host_name, argv, commandline, env = parse_check_request(body)
    except SettingsError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    try:
        target = parse_host(host_name) if host_name else host
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=f"[Optim] {exc}") from None
    if target is None or target not in checked_hosts():
        allowed = ", ".join(h.value for h in checked_hosts())
        raise HTTPException(status_code=422, detail=f"[Optim] host: {host_name!r} is not allowed; allowed: {allowed}")
    if commandline:
        try:
            argv += split_command_line(commandline)
        except ValueError as exc:
            raise HTTPException(
                status_code=422, detail=f"[Optim] commandline: {commandline!r} cannot be split: {exc}"
            ) from None
    findings = run_checks(CheckInput(target, argv, env, facts() if facts else RuntimeFacts()))
    return {
        "host": target.value,
        "argv": argv,
        "exit_code": exit_code(findings),
        "findings": [f.to_dict() for f in findings],
    }


def _profiles_listing() -> list[dict[str, Any]]:
    """``GET /profiles``: every profile with what it resolves to on each checked host."""
    out = []
    for profile in PROFILES.values():
        per_host = {}
        for h in checked_hosts():
            try:
                hp = resolve(profile, h)
            except ProfileError:
                continue
            per_host[h.value] = {
                "flags": list(hp.flags),
                "env": dict(hp.env),
                "generation": hp.generation.to_dict(),
            }
        out.append(
            {
                "name": profile.name,
                "title": profile.title,
                "vram_gb": profile.vram_gb,
                "description": profile.description,
                "hosts": per_host,
            }
        )
    return out
