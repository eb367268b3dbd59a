"""Apply/restore building blocks, including the inference-mode trap Forge sets for weight rewrites."""

from __future__ import annotations

import types

import pytest
import torch

from lib_optim.patching import Restorer, patched_attr, patched_item, weight_edit_mode


def test_patched_attr_restores_value_and_absence():
    class Thing:
        shared = "class"

    obj = Thing()
    obj.value = 1
    with patched_attr(obj, "value", 2):
        assert obj.value == 2
    assert obj.value == 1
    with patched_attr(obj, "shared", "instance"):
        assert obj.shared == "instance"
    assert "shared" not in vars(obj) and obj.shared == "class"  # not pinned onto the instance
    module = types.ModuleType("m")
    with patched_attr(module, "new", 3):
        assert module.new == 3
    assert not hasattr(module, "new")


def test_patched_item():
    data = {"a": 1}
    with patched_item(data, "a", 2), patched_item(data, "b", 3):
        assert data == {"a": 2, "b": 3}
    assert data == {"a": 1}


def test_restorer_restores_in_reverse_even_if_one_step_fails_and_only_once():
    order: list[str] = []
    restorer = Restorer("test")
    restorer.callback(order.append, "first")
    restorer.callback(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    restorer.callback(order.append, "last")
    with pytest.raises(RuntimeError, match="boom"):
        restorer.close()
    assert order == ["last", "first"]
    assert restorer.close() is False  # idempotent
    with pytest.raises(RuntimeError, match="already restored"):
        restorer.callback(order.append, "late")


def _conv_made_in_inference_mode() -> torch.nn.Conv2d:
    # Forge builds its models inside torch.inference_mode() (modules/processing.py:911)
    with torch.inference_mode():
        return torch.nn.Conv2d(4, 8, 3, padding=1)


def _run_slow_cpu_conv(conv: torch.nn.Conv2d) -> None:
    # the non-oneDNN CPU convolution views the weight (slow_conv2d's view_weight_2d), which is where a
    # mismatched parameter fails; Forge hit it in a hires pass on CPU
    with torch.backends.mkldnn.flags(enabled=False), torch.inference_mode():
        conv(torch.randn(2, 4, 12, 12))


def test_rewriting_an_inference_parameter_outside_inference_mode_breaks_cpu_conv():
    conv = _conv_made_in_inference_mode()
    with torch.inference_mode(False), torch.no_grad():  # what a naive rewrite from process() does
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="version counter"):
        _run_slow_cpu_conv(conv)


def test_weight_edit_mode_rewrites_in_the_parameters_own_mode():
    conv = _conv_made_in_inference_mode()
    with weight_edit_mode(conv.weight):
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    _run_slow_cpu_conv(conv)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    normal = torch.nn.Conv2d(4, 8, 3, padding=1)
    with torch.inference_mode(), weight_edit_mode(normal):  # an ordinary model, edited from inside a generation
        normal.to(memory_format=torch.channels_last)
    assert not normal.weight.is_inference()
    with torch.no_grad():
        normal.weight.add_(0)  # ordinary tensors keep their version counter: in-place updates still work
