"""The HTTP API: /optim/v1/* routes, --api-auth, and refusing bad Optim args before the host runs them."""

from __future__ import annotations

import base64

import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi import Depends, FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lib_optim.api import auth_dependency, parse_api_auth, register_routes, validation_error  # noqa: E402
from lib_optim.host_specs.kinds import HostKind  # noqa: E402
from lib_optim.launch.checker import Finding, Severity  # noqa: E402
from lib_optim.settings import FIELD_NAMES, SettingsError  # noqa: E402


def make_app(api_auth: str | None = None, validate=None):
    """An app with a stand-in for the host's txt2img route.

    Like the host, the route is added with the --api-auth dependency when credentials are set
    (A1111 v1.10.1 modules/api/api.py:274-277) and receives the request body as JSON.
    """
    app = FastAPI()
    received: list[dict] = []
    deps = [Depends(auth_dependency(parse_api_auth(api_auth)))] if api_auth else []

    def txt2img(body: dict) -> dict:
        received.append(body)
        return {"images": [], "info": "ok"}

    app.add_api_route("/sdapi/v1/txt2img", txt2img, methods=["POST"], dependencies=deps)
    app.add_api_route("/sdapi/v1/img2img", txt2img, methods=["POST"], dependencies=deps)
    status = {"host": "a1111", "findings": [Finding("unknown-flag", Severity.ERROR, "--x", "m", "f").to_dict()]}
    register_routes(app, host=HostKind.A1111, status=lambda: status, api_auth=api_auth, validate=validate)
    return app, received


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_valid_request_reaches_the_host_unchanged():
    app, received = make_app()
    body = {
        "prompt": "a cat",
        "alwayson_scripts": {"optim": {"args": [{"attention": "split", "channels_last": True, "vae_on_cpu": True}]}},
    }
    response = TestClient(app).post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    assert received == [body]


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/sdapi/v1/img2img"])
@pytest.mark.parametrize(
    ("args", "field", "value"),
    [
        ([{"attention": "warp"}], "attention", "'warp'"),
        ([{"inference_memory_mb": 5}], "inference_memory_mb", "5"),
        ([True, "sdp", "sideways"], "channels_last", "'sideways'"),
        ([{"vae_on_cpu": "yes please"}], "vae_on_cpu", "'yes please'"),
        ([{"atention": "sdp"}], "args", "'atention'"),
        ({"attention": "sdp"}, "args", "{'attention': 'sdp'}"),
    ],
)
def test_bad_values_fail_the_request_and_change_nothing(path, args, field, value):
    app, received = make_app()
    body = {"prompt": "x", "alwayson_scripts": {"Optim": {"args": args}}}
    response = TestClient(app).post(path, json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert f"{field}:" in detail
    assert value in detail
    assert "allowed" in detail
    assert received == []  # the host never saw it


def test_requests_without_our_args_pass_through():
    app, received = make_app()
    client = TestClient(app)
    for body in ({"prompt": "x"}, {"alwayson_scripts": {"other": {"args": [1]}}}, {"alwayson_scripts": {"optim": {}}}):
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert len(received) == 3


def test_availability_check_runs_for_enabled_settings():
    def validate(settings):
        if settings.attention.value == "xformers":
            raise ValueError("[Optim] attention: 'xformers' is not available here; allowed: host, sdp")

    app, received = make_app(validate=validate)
    client = TestClient(app)
    bad = {"alwayson_scripts": {"optim": {"args": [{"attention": "xformers"}]}}}
    assert client.post("/sdapi/v1/txt2img", json=bad).status_code == 422
    off = {"alwayson_scripts": {"optim": {"args": [{"enabled": False, "attention": "xformers"}]}}}
    assert client.post("/sdapi/v1/txt2img", json=off).status_code == 200
    assert len(received) == 1


def test_optim_routes():
    app, _ = make_app()
    client = TestClient(app)
    status = client.get("/optim/v1/status").json()
    assert status["host"] == "a1111"
    schema = client.get("/optim/v1/schema").json()
    assert set(schema["properties"]) == set(FIELD_NAMES)
    profiles = client.get("/optim/v1/profiles").json()
    assert {"8gb-low", "8gb-medium", "8gb-high", "8gb-xl", "12gb", "16gb", "24gb", "cpu"} <= {
        p["name"] for p in profiles
    }
    assert "--medvram" in profiles[0]["hosts"]["a1111"]["flags"]
    check = client.post(
        "/optim/v1/check", json={"host": "forge", "commandline": "--medvram --attention-split --attention-quad"}
    )
    assert check.status_code == 200
    result = check.json()
    assert result["exit_code"] == 2
    assert {f["rule"] for f in result["findings"]} >= {"ignored-by-host", "exclusive-flags"}
    default_host = client.post("/optim/v1/check", json={"args": ["--use-cuda-dsa"]}).json()
    assert default_host["host"] == "a1111"
    assert default_host["findings"][0]["subject"] == "--use-cuda-dsa"


@pytest.mark.parametrize(
    ("payload", "text"),
    [({"host": "comfy"}, "'comfy'"), ({"host": "sdnext"}, "'sdnext'"), ({"commandline": 'a "b'}, "cannot be split")],
)
def test_check_route_errors_name_the_field(payload, text):
    app, _ = make_app()
    response = TestClient(app).post("/optim/v1/check", json=payload)
    assert response.status_code == 422
    assert text in response.json()["detail"]


def test_check_route_knows_reforge_flags():
    app, _ = make_app()
    body = TestClient(app).post(
        "/optim/v1/check", json={"host": "reforge", "args": ["--reserve-vram", "1", "--vae-in-cpu"]}
    )
    assert body.status_code == 200 and body.json()["findings"] == []
    body = TestClient(app).post("/optim/v1/check", json={"host": "reforge", "args": ["--gpu-device-id", "0"]})
    assert [f["key"] for f in body.json()["findings"]][:1] == ["unknown-flag:--gpu-device-id"]


def test_api_auth_is_honoured_on_our_routes_and_kept_on_the_host_route():
    app, received = make_app(api_auth="alice:secret,bob:pw")
    client = TestClient(app)
    for path in ("/optim/v1/status", "/optim/v1/schema", "/optim/v1/profiles"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=basic("alice", "wrong")).status_code == 401
        assert client.get(path, headers=basic("bob", "pw")).status_code == 200
    body = {"alwayson_scripts": {"optim": {"args": [{"attention": "sdp"}]}}}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 401
    assert client.post("/sdapi/v1/txt2img", json=body, headers=basic("alice", "secret")).status_code == 200
    assert len(received) == 1


def test_registering_twice_keeps_one_set_of_routes():
    app, _received = make_app()
    register_routes(app, host=HostKind.A1111, status=dict, api_auth=None)
    paths = [getattr(r, "path", None) for r in app.router.routes]
    assert paths.count("/optim/v1/status") == 1
    assert sum(type(r).__name__ == "_ValidatingRoute" for r in app.router.routes) == 1
    assert TestClient(app).post("/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 200


def test_validation_error_function_directly():
    assert validation_error({"alwayson_scripts": {"optim": {"args": [True, "sdp"]}}}, HostKind.A1111) is None
    assert "on WebUI Forge f2" in validation_error(
        {"alwayson_scripts": {"optim": {"args": [{"attention": "invokeai"}]}}}, HostKind.FORGE
    )
    with pytest.raises(SettingsError):
        raise SettingsError("attention", "x", "y")


def test_status_route_serves_the_compile_warm_up_as_the_runtime_has_it():
    from lib_optim.compile import CompileWarmup, WarmupState
    from lib_optim.runtime import Runtime

    rt = Runtime(host=HostKind.A1111, warmup=CompileWarmup())
    app = FastAPI()
    register_routes(app, host=HostKind.A1111, status=rt.status, api_auth=None)
    client = TestClient(app)
    for state in (
        WarmupState(),
        WarmupState("running", 12, 38, seconds=20.0, family="sd", width=512, height=512, batch=1),
        WarmupState("done", 38, 38, seconds=74.04, family="sd", width=512, height=512, batch=1),
        WarmupState("failed", 3, 38, seconds=5.0, reason="install triton"),
    ):
        rt.warmup._state = state
        warmup = client.get("/optim/v1/status").json()["compile"]["warmup"]
        assert warmup == state.to_dict()
    assert warmup["state"] == "failed" and warmup["reason"] == "install triton"
    assert {"total_compiles", "total_compile_seconds"} <= set(client.get("/optim/v1/status").json()["compile"])
