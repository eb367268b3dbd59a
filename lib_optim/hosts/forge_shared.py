"""What the two Forge-lineage adapters share: Forge f2 (:mod:`lib_optim.hosts.forge`) and Forge previous /
reForge (:mod:`lib_optim.hosts.ldm_patched`).

Both back ends descend from the same code: the loaded model is ``sd_models.model_data.sd_model`` with a
``forge_objects`` bundle (UNet patcher, VAE object), the VAE object reads ``device``/``vae_dtype``/
``output_device``/``patcher`` at call time, loaded models are ``LoadedModel`` entries in
``current_loaded_models``, and attention functions are module globals that other modules copy by name
(docs/hosts.md §3.4, §3.5, §3.6, §5.3, §5.5). Nothing here imports host code: the host's modules are passed in.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lib_optim.adapter import BackendInfo, NotSupportedHere, Session
from lib_optim.attention import Attention, directml_reason
from lib_optim.compile import CompileRegion
from lib_optim.hosts import compile_regions
from lib_optim.hosts.base import HostBase, HostModules, unet_family
from lib_optim.log import get_logger
from lib_optim.patching import Restorer, patched_attr, weight_edit_mode
from lib_optim.settings import GenerationSettings, Tri, VaeTiling
from lib_optim.vae import tile_vae

log = get_logger(__name__)

MB = 1024 * 1024
# the CFG scale of the compile warm-up's sampling step: anything but 1 (at 1 the hosts skip the uncond batch)
WARMUP_CFG = 7.0


@dataclass(frozen=True)
class WarmupCalls:
    """Where a Forge-lineage host keeps what one sampling step goes through (docs/hosts.md §6.11), each as (module,
    function): loading the UNet for sampling, the CFG step that batches cond and uncond as memory allows, the
    clean-up, and the conversion of a text encoder's output into the back end's condition list."""

    prepare: tuple[str, str]
    sample: tuple[str, str]
    cleanup: tuple[str, str]
    conditions: tuple[str, str]

    def resolve(self, modules: HostModules) -> tuple[Callable[..., Any], ...] | None:
        found = []
        for module, name in (self.prepare, self.sample, self.cleanup, self.conditions):
            function = getattr(modules.get(module), name, None)
            if not callable(function):
                return None
            found.append(function)
        return tuple(found)


def dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def loaded_sd_model(modules: Callable[[str], types.ModuleType | None]) -> Any:
    """The loaded model, or None — never triggers a load (A1111-style ``shared.sd_model`` would). Before the
    first generation Forge f2 holds a placeholder there (``FakeInitialModel``, docs/hosts.md §7.1) with no
    ``forge_objects``: that is no model."""
    sd_models = modules("modules.sd_models")
    model_data = getattr(sd_models, "model_data", None) if sd_models is not None else None
    model = getattr(model_data, "sd_model", None)
    return model if getattr(model, "forge_objects", None) is not None else None


def diffusion_model(sd_model: Any) -> Any:
    """``forge_objects.unet.model.diffusion_model`` (docs/hosts.md §6.3, §6.5), or None."""
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    return getattr(getattr(unet, "model", None), "diffusion_model", None)


def conv_weights(module: Any) -> list[Any]:
    """The plain floating-point 4-D parameters (conv weights). Quantised parameter subclasses are skipped."""
    import torch

    out = []
    for param in module.parameters():
        if type(param) is torch.nn.Parameter and param.dim() == 4 and param.is_floating_point():
            out.append(param)
    return out


def channels_last_state(module: Any) -> bool | None:
    """True if every conv weight is channels-last, False if any is not, None if there are none."""
    import torch

    weights = conv_weights(module)
    if not weights:
        return None
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


@contextlib.contextmanager
def patched_unless_changed(obj: Any, name: str, value: Any) -> Iterator[Any]:
    """Like patched_attr, but leave a value someone else set meanwhile (e.g. Forge's memory slider)."""
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield original
    finally:
        if getattr(obj, name) is value or getattr(obj, name) == value:
            setattr(obj, name, original)
        else:
            log.info("%s.%s was changed by the host during the generation; keeping its value", obj, name)


class MemoryFormat:
    """Conv weights this generation converted to ``fmt`` (and what they were), re-applied idempotently.

    ``fix_backups(fmt)``, when given, is called after the restore with the host's format: weight backups the
    host took while our format was on (LoRA) are put back in the host's layout, so that removing a LoRA later
    restores the host's layout too.
    """

    def __init__(self, model: Any, fmt: Any, fix_backups: Callable[[Any], None] | None = None) -> None:
        self.model = model
        self.fmt = fmt
        self.fix_backups = fix_backups
        self.converted: list[tuple[Any, Any]] = []  # (parameter, its original memory format)

    def ensure(self) -> int:
        import torch

        count = 0
        for param in conv_weights(self.model):
            if not param.is_contiguous(memory_format=self.fmt):
                if param.is_contiguous(memory_format=torch.channels_last):
                    self.converted.append((param, torch.channels_last))
                else:
                    self.converted.append((param, torch.contiguous_format))
                with weight_edit_mode(param):
                    param.data = param.data.contiguous(memory_format=self.fmt)
                count += 1
        return count

    def restore(self) -> None:
        import torch

        for param, fmt in reversed(self.converted):
            with weight_edit_mode(param):
                param.data = param.data.contiguous(memory_format=fmt)
        self.converted.clear()
        if self.fix_backups is not None:
            self.fix_backups(torch.contiguous_format if self.fmt == torch.channels_last else torch.channels_last)


def in_format(weight: Any, fmt: Any) -> Any:
    """``weight`` (a backup tensor) in memory format ``fmt``: itself when it is not 4-D or already there."""
    if getattr(weight, "dim", lambda: 0)() != 4 or weight.is_contiguous(memory_format=fmt):
        return weight
    with weight_edit_mode(weight):
        return weight.contiguous(memory_format=fmt)


def unload_model(mm: Any, model: Any) -> int:
    """Unload the loaded copies of ``model`` (a patcher's ``.model``) from ``mm.current_loaded_models``, as
    ``free_memory`` does for one model (docs/hosts.md §4.4, §4.6, §4.7): pop its entry and ``model_unload()``
    it, which moves its weights to the patcher's offload device. None of these back ends has a function that
    unloads one given model, and unloading its clones keeps the weights where they are, so a reload would
    reuse the old split.
    """
    count = 0
    loaded = mm.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        if getattr(loaded[i].model, "model", None) is model:
            loaded.pop(i).model_unload()
            count += 1
    if count:
        mm.soft_empty_cache()
    return count


# --- attention functions bound by name -------------------------------------------------------------------

Binding = tuple[Any, str]  # (module, attribute)
Finder = Callable[[], Iterable[Binding]]


class Rebinding:
    """One function switched in every module that binds it by name (``from backend.attention import
    attention_function``, ``from ldm_patched.ldm.modules.attention import optimized_attention``), for one
    generation.

    ``find()`` yields the (module, attribute) pairs to switch; it only ever looks at modules already imported
    (never imports one: that would change what the host has loaded). A binding module the host imports while
    the switch is on copies the switched function; :meth:`ensure` (at apply and at every sampling start) and
    :meth:`restore` find such copies and give them the host's own function back at the end.
    """

    def __init__(self, find: Finder, fn: Any, host_fn: Any) -> None:
        self.find = find
        self.fn = fn
        self.host_fn = host_fn  # what the host had chosen: a late import's copy of ``fn`` gets this back
        self.done: list[tuple[Any, str, Any]] = []  # (module, attribute, what it held before)

    def ensure(self) -> int:
        """Switch every binding not handled yet; returns how many were switched now."""
        handled = {(id(m), attr) for m, attr, _ in self.done}
        switched = 0
        for module, attr in self.find():
            if (id(module), attr) in handled or attr not in vars(module):
                continue
            handled.add((id(module), attr))
            before = vars(module)[attr]
            if before is self.fn and self.host_fn is not None and self.host_fn is not self.fn:
                before = self.host_fn  # imported during the generation: it copied our switch
            elif before is not self.fn:
                setattr(module, attr, self.fn)
                switched += 1
            self.done.append((module, attr, before))
        return switched

    def restore(self) -> None:
        self.ensure()  # modules imported since the last sampling start hold a copy too
        for module, attr, before in reversed(self.done):
            if vars(module).get(attr) is self.fn:
                setattr(module, attr, before)
        self.done.clear()


def listed_bindings(modules: HostModules, bindings: Sequence[tuple[str, str]]) -> Finder:
    """A :class:`Rebinding` finder over a fixed list of (module name, attribute), loaded modules only."""

    def find() -> Iterator[Binding]:
        for name, attr in bindings:
            module = modules.loaded(name)
            if module is not None:
                yield module, attr

    return find


def bindings_by_scan(attr: str, host_fn: Any, fn: Any, modules: Callable[[], Iterable[Any]] | None = None) -> Finder:
    """A :class:`Rebinding` finder over every loaded module whose global ``attr`` is the host's function —
    the modules that did ``from <attention module> import <attr>`` — whatever their number and name (reForge
    has about twenty, extensions can add more). A module imported after the first scan that holds ``fn``
    copied our switch (it is given ``host_fn`` back at the end); one that held ``fn`` already at the first
    scan is its own business and is left alone.

    Only plain module objects are read (``type(m) is ModuleType``): a lazily loaded module's
    ``__dict__`` access would import it.
    """
    present: set[int] | None = None

    def loaded() -> list[Any]:
        source = modules() if modules is not None else list(sys.modules.values())
        return [m for m in source if type(m) is types.ModuleType]

    def find() -> Iterator[Binding]:
        nonlocal present
        current = loaded()
        first = present is None
        if present is None:
            present = {id(m) for m in current}
        for module in current:
            value = module.__dict__.get(attr)
            if value is None:
                continue
            if value is host_fn or (value is fn and not first and id(module) not in present):
                yield module, attr

    return find


# --- VAE on the CPU ------------------------------------------------------------------------------------------


def vae_to_cpu(vae: Any, mm: Any, restorer: Restorer) -> str:
    """Run the VAE object ``vae`` (Forge f2 ``backend.patcher.vae.VAE``, ldm_patched ``ldm_patched.modules.sd.VAE``)
    on the CPU in float32 until ``restorer`` closes; returns a note for the log.

    ``decode``/``encode`` read ``device``, ``vae_dtype``, ``output_device`` and the patcher at call time
    (docs/hosts.md §5.3, §5.5): inputs go to ``device`` as ``vae_dtype``, outputs to ``output_device``, and
    ``load_models_gpu([patcher])`` puts the weights on ``patcher.load_device``. ``offload_device`` too, so an
    unload (ours or the host's) never moves the float32 copy to the GPU (``--always-gpu``).
    """
    import torch

    fsm = vae.first_stage_model
    patcher = vae.patcher
    cpu = torch.device("cpu")
    dtypes = {name: t.dtype for name, t in (*fsm.named_parameters(), *fsm.named_buffers()) if t.is_floating_point()}
    if str(vae.device) == "cpu" and set(dtypes.values()) <= {torch.float32}:
        return "VAE already on CPU in float32"

    def restore_dtypes() -> None:
        tensors = dict((*fsm.named_parameters(), *fsm.named_buffers()))
        for name, dtype in dtypes.items():
            if name in tensors and tensors[name].dtype != dtype:
                with weight_edit_mode(tensors[name]):
                    tensors[name].data = tensors[name].data.to(dtype)

    restorer.callback(restore_dtypes)
    restorer.enter(patched_attr(vae, "device", cpu))
    restorer.enter(patched_attr(vae, "vae_dtype", torch.float32))
    restorer.enter(patched_attr(vae, "output_device", cpu))
    restorer.enter(patched_attr(patcher, "load_device", cpu))
    restorer.enter(patched_attr(patcher, "offload_device", cpu))
    if mm is not None:
        # At restore: drop the CPU-resident entry, or the next load_models_gpu would find the patcher
        # "already loaded" (docs/hosts.md §4.3) and decode GPU inputs with CPU weights.
        restorer.callback(unload_model, mm, fsm)
        unloaded = unload_model(mm, fsm)  # frees its GPU memory now (weights to the CPU)
    else:
        unloaded = 0
    with weight_edit_mode(fsm):
        fsm.to(device=cpu, dtype=torch.float32)
    return f"VAE on CPU in float32 (unloaded from GPU: {bool(unloaded)})"


# --- xformers ------------------------------------------------------------------------------------------------


def usable_xformers(*, disabled: bool, directml: bool, cuda: Callable[[], bool]) -> tuple[types.ModuleType | None, str]:
    """The xformers module if the host's attention could run it here, else None and why (naming the fix).

    ``disabled``: ``--disable-xformers``; ``directml``: the host runs on DirectML, where it never uses xformers
    (docs/hosts.md §3.3, §3.5, §4.8).
    """
    import importlib

    if disabled:
        return None, "disabled by --disable-xformers"
    if directml:
        return None, "not supported with DirectML"
    if "xformers" in sys.modules and sys.modules["xformers"] is None:
        # A1111's import hook, kept by Forge previous and reForge, blocks the import unless the command line
        # says --xformers (docs/hosts.md §2.4)
        return None, "the WebUI blocks importing xformers unless it is started with --xformers"
    try:
        module = importlib.import_module("xformers")
        importlib.import_module("xformers.ops")
    except Exception as exc:  # noqa: BLE001 - a broken xformers build raises anything at import
        return None, f"xformers does not import ({type(exc).__name__}: {exc}); install a build matching torch"
    if getattr(module, "_has_cpp_library", True) is False:  # docs/hosts.md §3.3
        return None, "xformers has no compiled kernels for this torch build"
    if not cuda():
        return None, "xformers needs a CUDA GPU"
    return module, ""


# --- attention availability ------------------------------------------------------------------------------------


def present_backend_info(
    name: Attention, host_name: str, *, directml: bool, xformers: Callable[[], tuple[Any, str]]
) -> BackendInfo:
    """Whether the backend ``name``, whose host function ``host_name`` exists, can run here (Forge f2 and
    ldm_patched decide alike): not what torch-directml cannot run (docs/hosts.md §4.8), xformers only when
    ``xformers()`` gives its module (else its reason), SDPA only with torch ≥ 2.0."""
    reason = directml_reason(name) if directml else ""
    if reason:
        return BackendInfo(name, False, host_name, reason)
    if name is Attention.XFORMERS:
        module, why = xformers()
        return BackendInfo(name, module is not None, host_name, why)
    if name is Attention.SDP:
        import torch

        ok = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        return BackendInfo(name, ok, host_name, "" if ok else "needs torch >= 2.0")
    return BackendInfo(name, True, host_name)


def kernel_backend_info(name: Attention, *, directml: bool, cuda: Callable[[], bool]) -> BackendInfo:
    """Whether a kernel we call ourselves (a registry Kernel binding: rebound in place of the UNet's attention
    function) can run here: not under DirectML (docs/hosts.md §4.8), else its registry entry's reason, which
    names the fix ("pip install …", "needs a CUDA GPU", the compute capability)."""
    host_name = f"attention_{name.value.replace('-', '_')}"  # what kernels.host_attention_function is called
    reason = directml_reason(name) if directml else ""
    if not reason:
        reason = name.backend.unavailable_reason("cuda" if cuda() else "cpu")
    return BackendInfo(name, not reason, host_name, reason)


# --- VAE tiling ------------------------------------------------------------------------------------------------


def tile_vae_object(session: Session, vae: Any, mm: Any) -> None:
    """``vae_tiling`` for a VAE object (Forge f2, ldm_patched): ``on``/``auto`` our tiled decoder/encoder on its
    ``first_stage_model`` (docs/hosts.md §5.6, :func:`lib_optim.vae.tile_vae`); with every value the Never OOM switch
    ``VAE_ALWAYS_TILED`` is ignored for this generation (§5.4, §5.5), so ``off`` means untiled up front (the host's
    own tiled retry after an out-of-memory error remains)."""
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        session.data["vae_tiling_unavailable"] = "no VAE loaded"
        log.warning("vae_tiling: no VAE loaded; nothing changed")
        return
    session.restorer.notes.append(tiling_without_always_tiled(vae, mm, session.restorer))
    if session.settings.vae_tiling is not VaeTiling.OFF:
        tile_vae(session, vae.first_stage_model)


def tiling_without_always_tiled(vae: Any, mm: Any, restorer: Restorer) -> str:
    """While ``restorer`` is open, the VAE class of ``vae`` (Forge f2 ``backend.patcher.vae.VAE``, ldm_patched
    ``ldm_patched.modules.sd.VAE``) decodes and encodes as if ``VAE_ALWAYS_TILED`` were false: the per-generation
    ``vae_tiling`` choice decides, not the global switch the built-in Never OOM script sets in its own ``process``
    (after ours, docs/hosts.md §5.4). The global is read inside ``decode_inner``/``encode_inner`` at call time
    (§5.4, §5.5), so each call sees it false and finds it as it was afterwards; the class methods, not the
    instance's, so a ``clone()`` of the VAE object is covered too. Forge's own tiled retry after an out-of-memory
    error stays. Returns a note for the log."""
    cls = type(vae)
    wrapped = []
    for name in ("decode_inner", "encode_inner"):
        original = vars(cls).get(name)
        if not callable(original):
            continue  # a build without the method has no switch to neutralise there

        def call(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            saved = getattr(mm, "VAE_ALWAYS_TILED", False)
            mm.VAE_ALWAYS_TILED = False
            try:
                return _original(self, *args, **kwargs)
            finally:
                mm.VAE_ALWAYS_TILED = saved

        call.__wrapped__ = original  # type: ignore[attr-defined]
        restorer.enter(patched_attr(cls, name, call))
        wrapped.append(name)
    return f"VAE_ALWAYS_TILED ignored by {', '.join(wrapped)}" if wrapped else "no VAE_ALWAYS_TILED switch here"


class ForgeFamilyAdapter(HostBase):
    """What the Forge f2 adapter (:mod:`lib_optim.hosts.forge`) and the Forge previous / reForge one
    (:mod:`lib_optim.hosts.ldm_patched`) do alike: the host modules they are given, the version, CUDA, the
    ``forge_objects`` of the loaded model, the VAE on the CPU and VAE tiling (docs/hosts.md §5.3, §5.5).
    Subclasses name their back end's modules (``args_module``, :meth:`memory_management`)."""

    args_module = ""  # the module whose ``args`` holds the back end's launch flags
    own_vae_choice = "the WebUI's own choice at load"  # what put the VAE on the CPU when no flag did
    warmup_calls: WarmupCalls | None = None  # the compile warm-up's sampling step

    def __init__(
        self,
        modules: Mapping[str, types.ModuleType] | None = None,
        cuda_available: Callable[[], bool] | None = None,
    ) -> None:
        self._modules = HostModules(modules)
        self._cuda_available = cuda_available

    def memory_management(self) -> Any:
        """The back end's memory-management module (imported if need be)."""
        raise NotImplementedError

    def compile_region(self, family: str, root: Any) -> CompileRegion:
        """What keeps the family's block code in ``root`` traceable (docs/hosts.md §6.10): our einops, traceable
        copies of its attention code, the free-memory figure measured before the region. The weights token is
        constant: the Forges apply LoRA weights before sampling (replaced Parameters, which the compiler's weight
        fingerprint sees), never lazily in a forward."""
        free_patches, measure = compile_regions.free_memory_patch(self._modules, family)
        return CompileRegion(
            patches=[
                *compile_regions.einops_patches(self._modules, family),
                *compile_regions.rewrite_patches(self._modules, family, root),
                *compile_regions.isfunction_patches(self._modules, family),
                *compile_regions.partial_patches(self._modules, family),
                *free_patches,
            ],
            weights_token=lambda: "applied before sampling",
            interrupt=compile_regions.interrupt_check(self._modules),
            prepare=measure,
        )

    # compile warm-up ---------------------------------------------------------------------------------------

    def model_family(self, sd_model: Any) -> str | None:
        return unet_family(sd_model) if diffusion_model(sd_model) is not None else None

    def warmup_forward(self, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None]:
        """One sampling step through the host's own functions (docs/hosts.md §6.11): empty prompts' conditioning
        from the model's text encoder, the UNet loaded as sampling loads it, the CFG step (cond and uncond in one
        UNet batch when the host finds the memory for it, with its ``transformer_options``), under
        ``inference_mode`` like the host's sampling. Inpainting models (more UNet input channels than latent ones)
        have none: their image conditioning is not an empty prompt's."""
        functions = self.warmup_calls.resolve(self._modules) if self.warmup_calls is not None else None
        devices = self._modules.get("modules.devices")
        unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
        if functions is None or devices is None or unet is None:
            raise NotSupportedHere("[Optim] compile warm-up: the sampling functions or the model are missing")
        prepare, sample, cleanup, conditions = functions
        channels = int(getattr(getattr(sd_model.forge_objects, "vae", None), "latent_channels", 4) or 4)
        if getattr(diffusion_model(sd_model), "in_channels", channels) != channels:
            raise NotSupportedHere("[Optim] compile warm-up: not for inpainting models")
        conditioning = getattr(self._modules.get("modules.prompt_parser"), "SdConditioning", None)

        def run() -> None:
            import torch

            device = devices.device
            prompts = [""] * batch
            texts = conditioning(prompts, width=width, height=height) if conditioning is not None else prompts
            with torch.inference_mode():
                cond = sd_model.get_learned_conditioning(texts)
                x = torch.zeros((batch, channels, height // 8, width // 8), device=device, dtype=torch.float32)
                sigma = torch.full((batch,), 1.0, device=device, dtype=torch.float32)
                prepare(unet, x)
                try:
                    sample(unet.model, x, sigma, conditions(cond), conditions(cond), WARMUP_CFG, unet.model_options, 0)
                finally:
                    cleanup(unet)

        return run

    def warmup_decode(self, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None]:
        import torch

        channels = int(getattr(getattr(sd_model.forge_objects, "vae", None), "latent_channels", 4) or 4)
        return self.decode_latents(sd_model, width, height, batch, channels=channels, grad_mode=torch.inference_mode)

    def version(self) -> str:
        module = self._modules.get("modules_forge.forge_version")
        return str(getattr(module, "version", "unknown"))

    def _cuda(self) -> bool:
        if self._cuda_available is not None:
            return self._cuda_available()
        import torch

        return bool(torch.cuda.is_available())

    def _forge_object(self, p: Any, name: str) -> Any:
        return getattr(getattr(getattr(p, "sd_model", None), "forge_objects", None), name, None)

    def _vae(self, p: Any) -> Any:
        return self._forge_object(p, "vae")

    def _vae_model(self, p: Any) -> Any:
        """The VAE's ``nn.Module`` (``forge_objects.vae.first_stage_model``, docs/hosts.md §5.3)."""
        return getattr(self._vae(p), "first_stage_model", None)

    def _channels_last_target(self, p: Any, settings: GenerationSettings, session: Session) -> tuple[Any, ...] | None:
        """(UNet patcher, its model, the diffusion model, the wanted memory format), or None when there is
        nothing to convert (no UNet loaded, or a DiT without conv weights)."""
        import torch

        patcher = self._forge_object(p, "unet")
        kmodel = getattr(patcher, "model", None)
        model = getattr(kmodel, "diffusion_model", None)
        if model is None:
            log.warning("channels_last: no UNet loaded; nothing changed")
            return None
        if not conv_weights(model):
            session.restorer.notes.append("channels_last: the model has no conv weights (DiT); nothing to do")
            return None
        fmt = torch.channels_last if settings.channels_last is Tri.ON else torch.contiguous_format
        return patcher, kmodel, model, fmt

    def _convert_memory_format(
        self, settings: GenerationSettings, session: Session, model: Any, fmt: Any, fix_backups: Callable[[Any], None]
    ) -> MemoryFormat:
        """Convert ``model``'s conv weights to ``fmt`` for the generation (restored when it ends)."""
        state = MemoryFormat(model, fmt, fix_backups)
        session.restorer.callback(state.restore)
        count = state.ensure()
        session.data["memory_format"] = state
        label = "channels_last" if settings.channels_last is Tri.ON else "contiguous"
        session.restorer.notes.append(f"UNet {label} ({count} conv weights converted)")
        return state

    def _why_vae_on_cpu(self) -> str:
        """Which launch flag put the VAE on the CPU (docs/hosts.md §5.3, §4.6, §4.7)."""
        args = getattr(self._modules.loaded(self.args_module), "args", None)
        if getattr(args, "always_cpu", False):
            return "--always-cpu (everything runs on the CPU)"
        if getattr(args, "vae_in_cpu", False):
            return "--vae-in-cpu"
        return self.own_vae_choice

    def apply_vae_on_cpu(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        vae = self._vae(p)
        if settings.vae_on_cpu is Tri.OFF:
            # Nothing to undo per generation: a CPU VAE here was chosen at load (§5.3, §5.5), by a launch flag.
            if vae is not None and str(getattr(vae, "device", "")) == "cpu":
                log.warning("vae_on_cpu=off: the VAE is on the CPU by %s; it stays there", self._why_vae_on_cpu())
            return
        if vae is None or getattr(vae, "patcher", None) is None or getattr(vae, "first_stage_model", None) is None:
            log.warning("vae_on_cpu: no VAE loaded; nothing changed")
            return
        # §5.3; the VAE object is read at call time on every Forge
        session.restorer.notes.append(vae_to_cpu(vae, self.memory_management(), session.restorer))

    def apply_vae_tiling(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        tile_vae_object(session, self._vae(p), self.memory_management())
