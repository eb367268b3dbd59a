"""The "Optim" benchmark tab under the gradio each host pins (A1111: 3.41.2, Forge f2: 4.40.0).

Run by tools/test.sh in one virtualenv per gradio version (like tests/test_ui.py); without gradio it is skipped.
"""

from __future__ import annotations

import inspect

import pytest

gr = pytest.importorskip("gradio")

from lib_optim import ui  # noqa: E402
from lib_optim.bench.generation import KIND_LABELS  # noqa: E402

pytestmark = pytest.mark.gradio


def _handlers(blocks):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns  # 4.x: dict, 3.x: list
    return [f.fn for f in fns]


def build(**kwargs):
    calls = []

    def run(prompt, width, height, steps, kinds, repeats, progress):
        calls.append((prompt, width, height, steps, kinds, repeats))
        progress(0.5, "half way")
        return "<table>ok</table>", {"attention": "sdp", "enabled": True}

    def make_default(winner):
        calls.append(("default", winner))
        return "<p>saved</p>"

    tab = ui.build_bench_tab(run=run, make_default=make_default, **kwargs)
    return tab, calls


def test_returns_what_on_ui_tabs_expects_and_renders_inside_the_host_ui():
    (blocks, title, elem_id), _ = build()
    assert isinstance(blocks, gr.Blocks)
    assert (title, elem_id) == ("Optim", "optim_tab")
    # how both hosts place extension tabs (A1111 v1.10.1 modules/ui.py: `with gr.TabItem(label, id=ifid,
    # elem_id=f"tab_{ifid}"): interface.render()`; Forge f2 the same)
    with gr.Blocks(), gr.Tabs(), gr.TabItem(title, id=elem_id, elem_id=f"tab_{elem_id}"):
        blocks.render()


def test_run_reports_progress_and_returns_html_and_the_winner():
    (blocks, _, _), calls = build(kinds=["attention", "vae_on_cpu"], width=256, steps=4)
    on_run, make_default = _handlers(blocks)
    # gradio injects a progress tracker for a parameter whose default is gr.Progress (3.41 and 4.40)
    assert isinstance(inspect.signature(on_run).parameters["progress"].default, gr.Progress)
    updates = []
    out = on_run(
        "a cat",
        256.0,
        512,
        4,
        [KIND_LABELS["attention"], KIND_LABELS["vae_on_cpu"]],
        3.0,
        progress=lambda *a, **k: updates.append((a, k)),
    )
    assert out == ("<table>ok</table>", {"attention": "sdp", "enabled": True}, "")
    assert calls == [("a cat", 256, 512, 4, ["attention", "vae_on_cpu"], 3)]
    assert updates == [((0.5,), {"desc": "half way"})]
    assert make_default({"attention": "sdp"}) == "<p>saved</p>"


def test_inputs_have_the_given_defaults():
    (blocks, _, _), _ = build(kinds=["attention", "channels_last", "inference_memory_mb"], width=320, height=448)
    by_id = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
    assert by_id["optim_bench_w"].value == 320
    assert by_id["optim_bench_h"].value == 448
    assert (by_id["optim_bench_repeats"].value, by_id["optim_bench_repeats"].maximum) == (1, 5)
    assert by_id["optim_bench_kinds"].value == [
        KIND_LABELS["attention"],
        KIND_LABELS["channels_last"],
        KIND_LABELS["inference_memory_mb"],
    ]
    assert by_id["optim_bench_prompt"].value
