"""The Optim accordion in a real WebUI page, in headless Chromium (Debian's chromium + chromedriver).

Skipped unless a host is configured (conftest.py) and selenium + chromium are installed. Screenshots go to
OPTIM_SCREENSHOTS (default /tmp).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = Path(os.environ.get("OPTIM_SCREENSHOTS", "/tmp"))


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("install Debian's chromium and chromium-driver for the browser test")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1500,2200",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open_accordion(driver, tab: str):
    wait = WebDriverWait(driver, 120)
    accordion = wait.until(ec.presence_of_element_located((By.ID, f"script_{tab}_optim_enabled")))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", accordion)
    header = accordion.find_element(By.CSS_SELECTOR, ".label-wrap")
    header.click()
    wait.until(ec.visibility_of_element_located((By.ID, f"script_{tab}_optim_attention")))
    return accordion


def test_accordion_renders_opens_and_fills_from_profile(webui, browser):
    browser.get(webui.url)
    accordion = _open_accordion(browser, "txt2img")
    text = accordion.text
    for label in ("Attention backend", "Channels-last UNet", "Fill from profile"):
        assert label in text
    # Every host runs on the CPU here (conftest.HOSTS), where VAE placement and GPU memory budgets change
    # nothing: the accordion does not show them (HostAdapter.meaningful_fields, FieldSpec.gpu_only)
    assert "VAE on CPU" not in text
    memory = browser.find_elements(By.ID, "script_txt2img_optim_inference_memory_mb")
    assert not (memory and memory[0].is_displayed())
    status = browser.find_element(By.ID, "script_txt2img_optim_status")
    assert webui.host in status.text.lower() or "attention" in status.text.lower()
    # the tooltip script (javascript/optim.js) decorated our controls
    assert browser.find_element(By.ID, "script_txt2img_optim_attention").get_attribute("title")
    # opening the accordion ticks the hidden enabled checkbox (InputAccordion)
    checkbox = browser.find_element(By.CSS_SELECTOR, "#script_txt2img_optim_enabled-checkbox input")
    assert checkbox.is_selected()
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", accordion)
    time.sleep(0.5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / f"optim-accordion-{webui.host}.png"))


def _set_number(driver, elem_id: str, value: int) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.clear()
    box.send_keys(str(value))
    box.send_keys("\t")


def test_benchmark_tab_runs_and_shows_results(webui, browser):
    browser.get(webui.url)
    wait = WebDriverWait(browser, 120)
    tab = wait.until(
        ec.element_to_be_clickable((By.XPATH, "//button[normalize-space(text())='Optim' and contains(@class, '')]"))
    )
    tab.click()
    wait.until(ec.visibility_of_element_located((By.ID, "optim_bench_run")))
    _set_number(browser, "optim_bench_w", 64)
    _set_number(browser, "optim_bench_h", 64)
    _set_number(browser, "optim_bench_steps", 1)
    _set_number(browser, "optim_bench_repeats", 2)
    browser.find_element(By.ID, "optim_bench_run").click()

    # while it runs, gradio's progress (gr.Progress in the tab, lib_optim/ui.py) says what is being measured
    def progress_text(driver) -> str:
        shown = driver.find_elements(By.CSS_SELECTOR, ".progress-level-inner, .progress-text, .meta-text")
        return " ".join(e.text for e in shown if e.is_displayed() and e.text.strip())

    WebDriverWait(browser, 300, poll_frequency=0.2).until(lambda d: progress_text(d).strip())
    seen = progress_text(browser)
    assert any(ch.isdigit() for ch in seen), seen  # a count or a fraction, not an empty spinner
    WebDriverWait(browser, 600).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#optim_bench_results table")))
    results = browser.find_element(By.ID, "optim_bench_results")
    assert "baseline" in results.text
    # the size and steps typed into the tab are what ran (the saved JSON records the counted steps)
    saved = max((webui.root / "outputs" / "optim-bench").glob("*.json"), key=lambda f: f.stat().st_mtime)
    document = json.loads(saved.read_text(encoding="utf-8"))
    meta = document["meta"]
    assert (meta["width"], meta["height"], meta["steps"], meta["repeats"]) == (64, 64, 1, 2)
    finished = [row for row in document["rows"] if row["error"] is None]
    assert finished and all(row["steps"] == 1 and row["runs"] == 2 for row in finished), document["rows"]
    browser.find_element(By.ID, "optim_bench_default").click()
    WebDriverWait(browser, 60).until(lambda d: "Saved as Settings" in d.find_element(By.ID, "optim_bench_message").text)
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'start'});", browser.find_element(By.ID, "optim_bench_intro")
    )
    time.sleep(0.5)
    browser.save_screenshot(str(SHOTS / f"optim-bench-tab-{webui.host}.png"))
    # put the defaults back for the other tests in this session
    webui.request(
        "POST",
        "/optim/v1/bench/default",
        {"settings": {"attention": "host", "channels_last": None, "vae_on_cpu": None}},
    )


def test_generate_from_the_ui_with_the_accordion(webui, browser):
    """Through the UI itself: channels-last on, Generate, the infotext and the status line show it ran and
    was restored."""
    browser.get(webui.url)
    accordion = _open_accordion(browser, "txt2img")
    for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 2)):
        _set_number(browser, elem_id, value)
    radio = accordion.find_element(
        By.XPATH, ".//*[@id='script_txt2img_optim_channels_last']//label[normalize-space(.)='on']"
    )
    radio.click()
    browser.find_element(By.ID, "txt2img_generate").click()
    WebDriverWait(browser, 600).until(
        lambda d: "Optim: channels_last=on" in d.find_element(By.ID, "html_info_txt2img").text
    )
    browser.find_element(By.ID, "script_txt2img_optim_refresh").click()
    WebDriverWait(browser, 60).until(
        lambda d: "(restored)" in d.find_element(By.ID, "script_txt2img_optim_status").text
    )
    record = webui.get("/optim/v1/status")["last_generations"][-1]
    assert record["settings"] == {"channels_last": "on"} and record["restored"]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", accordion)
    time.sleep(0.5)
    browser.save_screenshot(str(SHOTS / f"optim-generate-{webui.host}.png"))


def test_compile_and_tiled_vae_from_the_ui(webui, browser):
    """The two levers' controls in the accordion: compile and tiled VAE on, Generate; the infotext says what
    each did, and the generation's record shows both applied and restored."""
    browser.get(webui.url)
    accordion = _open_accordion(browser, "txt2img")
    for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 2)):
        _set_number(browser, elem_id, value)
    for field in ("compile", "vae_tiling"):
        radio = accordion.find_element(
            By.XPATH, f".//*[@id='script_txt2img_optim_{field}']//label[normalize-space(.)='on']"
        )
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", radio)
        radio.click()
    browser.find_element(By.ID, "txt2img_generate").click()
    WebDriverWait(browser, 900).until(lambda d: "Optim VAE tiling:" in d.find_element(By.ID, "html_info_txt2img").text)
    info = browser.find_element(By.ID, "html_info_txt2img").text
    assert "compile=on" in info and "vae_tiling=on" in info, info
    assert "Optim compile:" in info, info
    record = webui.get("/optim/v1/status")["last_generations"][-1]
    assert record["settings"] == {"compile": "on", "vae_tiling": "on"} and record["restored"], record
    assert record["telemetry"]["vae_tiling"]["events"][0]["tiled"] is True, record
