"""Start a real WebUI with this extension installed, on CPU, with a random-weight SD1.5 checkpoint.

Runs only when ``OPTIM_A1111_DIR``, ``OPTIM_FORGE_DIR``, ``OPTIM_FORGE_PREVIOUS_DIR`` and/or ``OPTIM_REFORGE_DIR``
name a WebUI checkout that starts on this machine (its Python: ``OPTIM_A1111_PYTHON`` / ``OPTIM_FORGE_PYTHON`` /
``OPTIM_FORGE_PREVIOUS_PYTHON`` / ``OPTIM_REFORGE_PYTHON``, default ``<checkout>/venv/bin/python``).
The extension is copied into ``<checkout>/extensions/sd-webui-optim-under-test`` for the session and
removed afterwards; the checkpoint is generated once into ``OPTIM_TEST_CACHE`` (default
``~/.cache/sd-webui-optim-tests``), outside the repository.
A test module that sets ``CHECKPOINT = "sdxl"`` gets a WebUI with a random-weight SDXL base checkpoint instead
(``sdxl_checkpoint.py``, about 7 GB, generated once into ``OPTIM_TEST_CACHE/models-sdxl``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "sd-webui-optim-under-test"
SHIPPED = ["lib_optim", "scripts", "javascript", "preload.py", "install.py", "style.css", "metadata.ini"]

HOSTS = {
    "a1111": ("OPTIM_A1111_DIR", "OPTIM_A1111_PYTHON", ["--use-cpu", "all", "--no-half", "--skip-torch-cuda-test"]),
    "forge": ("OPTIM_FORGE_DIR", "OPTIM_FORGE_PYTHON", ["--always-cpu", "--skip-torch-cuda-test"]),
    "forge-previous": (
        "OPTIM_FORGE_PREVIOUS_DIR",
        "OPTIM_FORGE_PREVIOUS_PYTHON",
        ["--always-cpu", "--skip-torch-cuda-test"],
    ),
    "reforge": ("OPTIM_REFORGE_DIR", "OPTIM_REFORGE_PYTHON", ["--always-cpu", "--skip-torch-cuda-test"]),
}
NO_HOST_REASON = "set OPTIM_A1111_DIR, OPTIM_FORGE_DIR, OPTIM_FORGE_PREVIOUS_DIR or OPTIM_REFORGE_DIR to a checkout"
REFINER = "sd15-random-refiner"
SDXL = "sdxl-random"  # the checkpoint of a module that sets CHECKPOINT = "sdxl"
CHECKPOINTS = ("sd15", "sdxl")
LORA = "optim-test-random"  # a random LoRA, installed into <checkout>/models/Lora for the session
START_TIMEOUT = float(os.environ.get("OPTIM_START_TIMEOUT", "600"))


@dataclass
class WebUI:
    host: str
    root: Path
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]
    request_timeout: float = 900  # seconds; an SDXL model on CPU gets more (see start_webui)

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def txt2img(self, optim_args: list[Any] | None = None, **extra: Any) -> tuple[int, Any]:
        payload: dict[str, Any] = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1, **extra}
        if optim_args is not None:
            payload["alwayson_scripts"] = {"optim": {"args": optim_args}}
        return self.request("POST", "/sdapi/v1/txt2img", payload)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cache() -> Path:
    return Path(os.environ.get("OPTIM_TEST_CACHE", Path.home() / ".cache" / "sd-webui-optim-tests"))


def _checkpoint(python: str) -> Path:
    cache = _cache()
    models = cache / "models"
    # a second checkpoint serves as the refiner (a model switch in the middle of sampling)
    for name, seed in (("sd15-random.safetensors", "0"), (REFINER + ".safetensors", "2")):
        target = models / name
        if not target.is_file():
            models.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [python, str(REPO / "tests" / "integration" / "sd15_checkpoint.py"), str(target), "--seed", seed],
                check=True,
                timeout=900,
            )
    lora = cache / "Lora" / f"{LORA}.safetensors"
    if not lora.is_file():
        lora.parent.mkdir(parents=True, exist_ok=True)
        script = REPO / "tests" / "integration" / "sd15_lora.py"
        subprocess.run([python, str(script), str(lora)], check=True, timeout=300)
    return models


def _sdxl_checkpoint(python: str) -> Path:
    """The SDXL checkpoint, in a folder of its own: the SD1.5 modules' ``--ckpt-dir`` never lists it, so a host that
    saved it as its last model (Forge f2 writes ``sd_model_checkpoint`` to config.json on a model change,
    modules_forge/main_entry.py:249-252) falls back to an SD1.5 one there instead of loading 7 GB."""
    target = _cache() / "models-sdxl" / f"{SDXL}.safetensors"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        script = REPO / "tests" / "integration" / "sdxl_checkpoint.py"
        subprocess.run([python, str(script), str(target)], check=True, timeout=3600)  # ~4 min on 2 busy cores
    return target


def checkpoint_args(checkpoint: str, python: str, sd15_models: Path) -> list[str]:
    """The host's model folder and model: the SD1.5 folder with its main model selected, or the SDXL file alone
    (``--ckpt`` makes every host select it, over what config.json says: modules/sd_models.py:167-171 in A1111,
    :173-177 in Forge f2, :163-167 in Forge previous, :284-288 in reForge). Without it a host with no saved choice
    takes the first file by name, the refiner ("sd15-random-refiner" sorts before "sd15-random."), whose random
    weights Forge f2 turns into a black (NaN) image, so a LoRA could not change it."""
    if checkpoint == "sd15":
        return ["--ckpt-dir", str(sd15_models), "--ckpt", str(sd15_models / "sd15-random.safetensors")]
    if checkpoint == "sdxl":
        sdxl = _sdxl_checkpoint(python)
        return ["--ckpt-dir", str(sdxl.parent), "--ckpt", str(sdxl)]
    raise ValueError(f"CHECKPOINT = {checkpoint!r}: use one of {', '.join(map(repr, CHECKPOINTS))}")


def _install_lora(root: Path, models: Path) -> Path:
    """The test LoRA in the host's default LoRA folder (``models/Lora`` in every host)."""
    target = root / "models" / "Lora" / f"{LORA}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(models.parent / "Lora" / f"{LORA}.safetensors", target)
    return target


def _install_extension(root: Path) -> Path:
    target = root / "extensions" / EXTENSION_NAME
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in SHIPPED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    return target


def _limit_address_space(limit: int | None):
    if limit is None:
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def host_python(host: str) -> str:
    dir_var, python_var, _ = HOSTS[host]
    return os.environ.get(python_var, str(Path(os.environ[dir_var]) / "venv" / "bin" / "python"))


def torch_address_space(host: str) -> int:
    """Bytes of virtual memory the host's Python maps once torch is imported: about 0.5 GiB for a CPU build of
    torch, 3 GiB for the CUDA 12.1 wheels of torch 2.1.2 (its CUDA libraries are mapped at import), 4.4 GiB for
    2.9.0's — so an address-space limit is set as headroom above it, whichever torch the host pins."""
    code = "import re, torch; print(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    out = subprocess.run([host_python(host), "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return int(out.stdout.split()[-1]) * 1024


def start_webui(
    host: str,
    extra_args: list[str] | None = None,
    address_space_limit: int | None = None,
    extra_env: dict[str, str] | None = None,
    checkpoint: str = "sd15",
) -> WebUI:
    """``address_space_limit``: bytes of virtual memory for the WebUI process, so a big enough tensor fails
    to allocate — a real out-of-memory error on a machine without a GPU. ``extra_env``: more environment.
    ``checkpoint``: "sd15" (the random SD1.5 models) or "sdxl" (the random SDXL base model)."""
    dir_var, _, cpu_flags = HOSTS[host]
    root = Path(os.environ[dir_var])
    python = host_python(host)
    models = _checkpoint(python)
    model_args = checkpoint_args(checkpoint, python, models)
    _install_extension(root)
    _install_lora(root, models)
    port = _free_port()
    log_path = Path(os.environ.get("OPTIM_TEST_LOGS", "/tmp")) / f"optim-webui-{host}-{port}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    env.pop("COMMANDLINE_ARGS", None)
    args = [
        python,
        "launch.py",
        *cpu_flags,
        "--skip-prepare-environment",
        "--api",
        "--server-name",
        "127.0.0.1",
        "--port",
        str(port),
        *model_args,
        "--optim-log-level",
        "DEBUG",
        *(extra_args or []),
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit_address_space(address_space_limit),  # noqa: PLW1509 - only setrlimit, no threads
        )
    # SDXL on CPU: loading 7 GB and a first compile of its blocks each take far longer than SD1.5's
    webui = WebUI(host, root, f"http://127.0.0.1:{port}", log_path, process, 3600 if checkpoint == "sdxl" else 900)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{host} exited with {process.returncode} during start-up:\n{webui.log()[-4000:]}")
        if "Startup time:" not in webui.log():
            # No request before the host says it is up: A1111 v1.10.1 starts serving (webui.py:79) before it
            # adds the API middleware (:112), and a request in between makes starlette build its middleware
            # stack, so create_api fails with "Cannot add middleware after an application has started" (seen
            # here once). The line is printed after the API and on_app_started (:122; Forge f2 the same).
            time.sleep(1)
            continue
        try:
            # our routes come from on_app_started, a moment after the host's own API routes
            ready = all(
                webui.request("GET", path, timeout=5)[0] == 200 for path in ("/sdapi/v1/sd-models", "/optim/v1/status")
            )
            if ready:
                return webui
        except OSError:
            pass
        time.sleep(1)
    stop_webui(webui)
    pytest.fail(f"{host} did not answer within {START_TIMEOUT:.0f} s:\n{webui.log()[-4000:]}")


def stop_webui(webui: WebUI) -> None:
    webui.process.terminate()
    try:
        webui.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        webui.process.kill()
        webui.process.wait(timeout=30)
    shutil.rmtree(webui.root / "extensions" / EXTENSION_NAME, ignore_errors=True)
    (webui.root / "models" / "Lora" / f"{LORA}.safetensors").unlink(missing_ok=True)


def configured_hosts() -> list[str]:
    return [name for name, (dir_var, _, _) in HOSTS.items() if os.environ.get(dir_var)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "webui" in metafunc.fixturenames:
        hosts = configured_hosts()
        if not hosts:
            metafunc.parametrize(
                "webui",
                [pytest.param(None, marks=pytest.mark.skip(reason=NO_HOST_REASON))],
            )
        else:
            metafunc.parametrize("webui", hosts, indirect=True, scope="module")


@pytest.fixture(scope="module")
def webui(request: pytest.FixtureRequest) -> Iterator[WebUI]:
    # a test module may ask for more environment for its WebUI (WEBUI_ENV = {...}) and for the SDXL checkpoint
    # (CHECKPOINT = "sdxl")
    instance = start_webui(
        request.param,
        extra_env=getattr(request.module, "WEBUI_ENV", None),
        checkpoint=getattr(request.module, "CHECKPOINT", "sd15"),
    )
    try:
        # Load the model now (A1111 loads it in a thread after start-up, Forge on the first generation),
        # so every test compares states of a loaded model.
        code, body = instance.txt2img()
        assert code == 200, body
        yield instance
    finally:
        stop_webui(instance)
        sys.stdout.write(f"\n[{request.param} log: {instance.log_path}]\n")
