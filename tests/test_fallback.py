"""Tests for lib_optim.oom.retry: recognising OOM (real torch types) and the one-retry ladder."""

from __future__ import annotations

import itertools

import pytest
import torch

from lib_optim.oom.retry import FallbackStep, infotext_note, is_out_of_memory, next_frugal
from lib_optim.settings import INFERENCE_MEMORY_MAX_MB, Attention, Compile, GenerationSettings, Tri, VaeTiling

A1111_BACKENDS = (Attention.SDP, Attention.SPLIT, Attention.SUB_QUAD, Attention.XFORMERS, Attention.V1)
FORGE_BACKENDS = (Attention.SDP, Attention.SPLIT, Attention.SUB_QUAD, Attention.XFORMERS)
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 8.00 GiB of which "
    "1.10 GiB is free. Of the allocated memory 5.20 GiB is allocated by PyTorch"
)

# ------------------------------------------------------------------------------------------ recognise


def test_real_torch_oom_type() -> None:
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError
    assert is_out_of_memory(torch.OutOfMemoryError(CUDA_OOM))
    # The type alone counts, whatever the message says.
    assert is_out_of_memory(torch.OutOfMemoryError("allocation failed"))


def test_oom_wrapped_with_raise_from() -> None:
    try:
        try:
            raise torch.OutOfMemoryError(CUDA_OOM)
        except torch.OutOfMemoryError as inner:
            raise ValueError("sampling failed") from inner
    except ValueError as outer:
        assert is_out_of_memory(outer)


def test_oom_as_the_context_of_another_error_several_levels_deep() -> None:
    def generate() -> None:
        try:
            raise torch.OutOfMemoryError(CUDA_OOM)
        except torch.OutOfMemoryError:
            # Raised while handling: the OOM is only the implicit __context__, as in a host's cleanup code.
            raise KeyError("cleanup failed")  # noqa: B904

    class JobError(Exception):
        """What a host's job wrapper raises."""

    with pytest.raises(JobError) as info:
        try:
            generate()
        except KeyError as middle:
            raise JobError("job failed") from middle
    assert is_out_of_memory(info.value)


def test_real_cpu_allocator_failure() -> None:
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**60, dtype=torch.uint8)
    assert is_out_of_memory(info.value)


@pytest.mark.parametrize(
    "message",
    [
        CUDA_OOM,
        "HIP out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.98 GiB total capacity)",
        "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB, max allowed: 18.13 GB)",
        "Could not allocate tensor with 2147483648 bytes. There is not enough GPU video memory available!",
        # DirectML around torch.baddbmm/softmax at 512x640 on an 8 GB card, the first line alone as hosts log it
        "Could not allocate tensor with 1342177280 bytes.",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    ],
)
def test_oom_messages_of_every_backend(message: str) -> None:
    assert is_out_of_memory(RuntimeError(message))


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("Expected all tensors to be on the same device, but found at least two devices"),
        RuntimeError("CUDA error: device-side assert triggered"),
        ValueError("the prompt ran out of memory tokens"),  # not a RuntimeError: wording alone does not count
        KeyError("model"),
        MemoryError(),  # Python's own, from PIL/numpy: no setting here helps
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_oom(exc: BaseException) -> None:
    assert not is_out_of_memory(exc)


def test_cyclic_chain_terminates() -> None:
    first = RuntimeError("first")
    second = RuntimeError("second")
    first.__context__ = second
    second.__context__ = first
    assert not is_out_of_memory(first)


# ----------------------------------------------------------------------------------------------- ladder


def enabled(**changes: object) -> GenerationSettings:
    return GenerationSettings(enabled=True, **changes)  # type: ignore[arg-type]


def test_a1111_first_retry_combines_attention_and_vae() -> None:
    step = next_frugal(
        enabled(),
        available=A1111_BACKENDS,
        supports_inference_memory=False,
        current_attention=Attention.XFORMERS,
    )
    assert step is not None
    assert step.settings == enabled(attention=Attention.SUB_QUAD, vae_on_cpu=Tri.ON)
    assert step.settings.inference_memory_mb is None
    assert infotext_note(step) == "retried after out of memory: attention=sub-quad, vae_on_cpu=on"
    assert step.reason == "out of memory: retrying once with sub-quad attention and the VAE on the CPU"


def test_split_when_sub_quad_is_not_available() -> None:
    step = next_frugal(
        enabled(),
        available=(Attention.SDP, Attention.SPLIT),
        supports_inference_memory=False,
        current_attention=Attention.SDP,
    )
    assert step is not None and step.settings.attention is Attention.SPLIT


def test_split_in_use_and_no_sub_quad_leaves_attention() -> None:
    step = next_frugal(
        enabled(attention=Attention.SPLIT),
        available=(Attention.SDP, Attention.SPLIT),
        supports_inference_memory=False,
        current_attention=Attention.SPLIT,
    )
    assert step is not None
    assert step.changes == ("vae_on_cpu=on",)


def test_host_attention_resolved_by_current_attention() -> None:
    # The settings say "host", the host was already on sub-quad: only the VAE is left to move.
    step = next_frugal(
        enabled(),
        available=A1111_BACKENDS,
        supports_inference_memory=False,
        current_attention=Attention.SUB_QUAD,
    )
    assert step is not None and step.changes == ("vae_on_cpu=on",)


def test_forge_raises_inference_memory_too() -> None:
    step = next_frugal(
        enabled(channels_last=Tri.ON),
        available=FORGE_BACKENDS,
        supports_inference_memory=True,
        current_attention=Attention.SDP,
        current_inference_memory_mb=1024,
    )
    assert step is not None
    assert step.settings == enabled(
        attention=Attention.SUB_QUAD, vae_on_cpu=Tri.ON, inference_memory_mb=2048, channels_last=Tri.ON
    )
    assert infotext_note(step) == (
        "retried after out of memory: attention=sub-quad, vae_on_cpu=on, inference_memory_mb=2048"
    )
    assert "fewer weights on the GPU" in step.reason


@pytest.mark.parametrize(
    ("settings_mb", "current_mb", "total_mb", "expected"),
    [
        (None, None, None, 2048),  # Forge's default 1024 doubled
        (3000, None, None, 6000),  # the settings' value doubled
        (None, 5000, None, 10000),  # the host's value in effect wins over the default
        (3000, None, 4096, 4096),  # capped at the card
        (None, 8192, 8192, None),  # already everything: no change
        (INFERENCE_MEMORY_MAX_MB, None, None, None),
    ],
)
def test_forge_inference_memory_rung(
    settings_mb: int | None, current_mb: int | None, total_mb: int | None, expected: int | None
) -> None:
    step = next_frugal(
        enabled(attention=Attention.SUB_QUAD, vae_on_cpu=Tri.ON, inference_memory_mb=settings_mb),
        available=FORGE_BACKENDS,
        supports_inference_memory=True,
        current_attention=None,
        current_inference_memory_mb=current_mb,
        total_memory_mb=total_mb,
    )
    if expected is None:
        assert step is None
    else:
        assert step is not None and step.settings.inference_memory_mb == expected
        assert step.changes == (f"inference_memory_mb={expected}",)


def test_already_frugal_is_none() -> None:
    frugal = enabled(attention=Attention.SUB_QUAD, vae_on_cpu=Tri.ON)
    assert (
        next_frugal(frugal, available=A1111_BACKENDS, supports_inference_memory=False, current_attention=None) is None
    )


def test_disabled_settings_were_not_in_effect() -> None:
    # The UI's values of a disabled Optim did nothing: the retry starts from the host's own settings.
    disabled = GenerationSettings(enabled=False, attention=Attention.SUB_QUAD, channels_last=Tri.ON)
    step = next_frugal(
        disabled, available=A1111_BACKENDS, supports_inference_memory=False, current_attention=Attention.SDP
    )
    assert step is not None
    assert step.settings == enabled(attention=Attention.SUB_QUAD, vae_on_cpu=Tri.ON)


@pytest.mark.parametrize("supports_inference_memory", [False, True])
def test_never_the_same_settings_twice(supports_inference_memory: bool) -> None:
    backends = FORGE_BACKENDS if supports_inference_memory else A1111_BACKENDS
    for attention, vae, channels_last, current in itertools.product(
        Attention, Tri, Tri, (None, Attention.SDP, Attention.SPLIT, Attention.SUB_QUAD)
    ):
        settings = enabled(attention=attention, vae_on_cpu=vae, channels_last=channels_last)
        seen = [settings]
        step: FallbackStep | None = next_frugal(
            settings, available=backends, supports_inference_memory=supports_inference_memory, current_attention=current
        )
        while step is not None:
            assert step.settings.enabled
            assert step.settings not in seen
            assert step.changes and step.reason
            assert step.settings.channels_last is channels_last  # only the ladder's fields change
            seen.append(step.settings)
            assert len(seen) < 20, "the ladder must end"
            step = next_frugal(
                step.settings,
                available=backends,
                supports_inference_memory=supports_inference_memory,
                current_attention=None,
            )


# ------------------------------------------------------------------------------------------ VAE tiling rung


@pytest.mark.parametrize("fits", [True, None])
def test_tiling_is_preferred_to_the_cpu_when_it_is_predicted_to_fit(fits: bool | None) -> None:
    step = next_frugal(
        enabled(attention=Attention.SUB_QUAD),
        available=A1111_BACKENDS,
        supports_inference_memory=False,
        current_attention=Attention.SUB_QUAD,
        supports_vae_tiling=True,
        tiled_vae_fits=fits,
    )
    assert step is not None
    assert step.changes == ("vae_tiling=on",)
    assert step.settings.vae_on_cpu is Tri.INHERIT
    assert "tiled" in step.reason


def test_cpu_when_tiling_is_predicted_not_to_fit_or_was_already_on() -> None:
    for base, fits in (
        (enabled(), False),
        (enabled(vae_tiling=VaeTiling.AUTO), True),
        (enabled(vae_tiling=VaeTiling.ON), None),
    ):
        step = next_frugal(
            base,
            available=(Attention.SUB_QUAD,),
            supports_inference_memory=False,
            current_attention=Attention.SUB_QUAD,
            supports_vae_tiling=True,
            tiled_vae_fits=fits,
        )
        assert step is not None and step.changes == ("vae_on_cpu=on",), (base, fits)
        assert step.settings.vae_tiling is base.vae_tiling


def test_no_tiling_rung_where_the_host_cannot_tile() -> None:
    step = next_frugal(
        enabled(),
        available=(Attention.SUB_QUAD,),
        supports_inference_memory=False,
        current_attention=Attention.SUB_QUAD,
        supports_vae_tiling=False,
        tiled_vae_fits=True,
    )
    assert step is not None and step.changes == ("vae_on_cpu=on",)


# ------------------------------------------------------------------------------------------ compile rung


@pytest.mark.parametrize("compile_", [Compile.ON, Compile.MAX_AUTOTUNE, Compile.AUTO])
def test_compile_is_turned_off_first(compile_: Compile) -> None:
    """Compile's own buffers (+0.5–4 GB by mode) are the first thing an eager retry does without; ``auto`` too, so
    that the retry cannot decide to compile."""
    step = next_frugal(
        enabled(compile=compile_, attention=Attention.SUB_QUAD),
        available=A1111_BACKENDS,
        supports_inference_memory=False,
        current_attention=Attention.SUB_QUAD,
    )
    assert step is not None and step.settings.compile is Compile.OFF
    assert step.changes == ("compile=off", "vae_on_cpu=on")
    assert step.reason == "out of memory: retrying once with compile off and the VAE on the CPU"


def test_compile_off_is_no_rung() -> None:
    frugal = enabled(attention=Attention.SUB_QUAD, vae_on_cpu=Tri.ON, compile=Compile.OFF)
    assert (
        next_frugal(frugal, available=A1111_BACKENDS, supports_inference_memory=False, current_attention=None) is None
    )
