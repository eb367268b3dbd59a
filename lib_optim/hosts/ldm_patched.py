"""Forge "previous" and reForge adapter: the two WebUIs that run the ``ldm_patched`` back end.

Every host module (``ldm_patched.*``, ``modules.*``, ``modules_forge.*``) is looked up lazily inside methods, so
this module imports without a WebUI. What each setting does, for one ``process_images`` call, restored
afterwards (the host facts, with file:line, are in docs/hosts.md):

attention
    The UNet: ``optimized_attention`` and ``optimized_attention_masked`` are module globals of
    ``ldm_patched.ldm.modules.attention`` that ``CrossAttention.forward`` reads at call time (§3.5, §3.6); they
    are rebound there and in every loaded module that copied them by name (``from … import
    optimized_attention``: two modules in Forge previous, about twenty in reForge, plus IP-Adapter) — found by
    identity, so extensions that copy them are switched too. A module imported during the generation gets
    the switch at the next sampling start and its own copy back at the end. The VAE: its attention is chosen
    per instance when the VAE is built (``AttnBlock.optimized_attention``, §3.5, §3.6), so the loaded VAE's
    instances are switched and given back exactly what they held. Not switched: the text encoders (they pick
    per call with ``optimized_attention_for_device``: SDPA or basic for short inputs, sub-quadratic on the CPU).
channels_last
    Converts the 4-D (conv) weights of ``forge_objects.unet.model.diffusion_model`` in place. Weight patching
    (LoRA) at load replaces weights with new Parameters after our hook ran (§6.5), so ``LoadedModel.model_load``
    is wrapped for the generation to convert those too, and weight backups taken meanwhile are put back in
    the host's layout at the end.
vae_on_cpu
    As on Forge f2: the VAE object reads ``device``/``vae_dtype``/``output_device``/``patcher`` at call time
    (§5.5), so it runs on the CPU in float32 for the generation and goes back to the host's device at the end.
inference_memory_mb
    ``model_management.minimum_inference_memory()`` — what ``load_models_gpu`` keeps free for computation, looked
    up by name at every load (§4.6, §4.7) — returns our value for the generation. Forge previous splits a model
    between GPU and CPU once, at its load, and never re-splits a loaded one (§4.6): the UNet is unloaded once
    when the new reserve would change its split, as on Forge f2. reForge re-plans every loaded model at every
    ``load_models_gpu`` (partial loading, §4.7), so nothing is unloaded there.

Where the fields added later apply here: the UNet's blocks are ``input_blocks``/``middle_block``/``output_blocks``
of ``UNetModel`` (§6.5) and the VAE's tiled functions are ``VAE.decode_tiled``/``encode_tiled`` of
``ldm_patched.modules.sd`` (§5.5).

§ = a section of docs/hosts.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from lib_optim.adapter import BackendInfo, EffectiveState, NotSupportedHere, Session
from lib_optim.attention import (
    Attention,
    Kernel,
    LdmPatchedFunctions,
    algorithms,
    choose_auto_attention,
    host_attention_function,
)
from lib_optim.host_specs import HostKind
from lib_optim.hosts import base
from lib_optim.hosts.forge_shared import (
    MB,
    ForgeFamilyAdapter,
    MemoryFormat,
    Rebinding,
    WarmupCalls,
    bindings_by_scan,
    channels_last_state,
    diffusion_model,
    dtype_name,
    in_format,
    kernel_backend_info,
    loaded_sd_model,
    patched_unless_changed,
    present_backend_info,
    unload_model,
    usable_xformers,
)
from lib_optim.log import get_logger
from lib_optim.patching import patched_attr
from lib_optim.settings import GenerationSettings

log = get_logger(__name__)

ATTENTION = "ldm_patched.ldm.modules.attention"
VAE_MODEL = "ldm_patched.ldm.modules.diffusionmodules.model"
MODEL_MANAGEMENT = "ldm_patched.modules.model_management"
ARGS = "ldm_patched.modules.args_parser"
HOSTS = (HostKind.FORGE_PREVIOUS, HostKind.REFORGE)

# The module globals the UNet reads at call time (§3.5, §3.6), each copied by name elsewhere.
UNET_ATTRIBUTES = ("optimized_attention", "optimized_attention_masked")
# What AttnBlock.__init__ can choose for the VAE (§3.5, §3.6): only instances holding one of these are switched.
VAE_FUNCTIONS = ("xformers_attention", "pytorch_attention", "normal_attention")

# A predicted GPU share of the UNet within this much of the current one counts as "the same split": Forge
# previous moves whole modules (§4.6), so the prediction is only that precise.
_SPLIT_TOLERANCE_FRACTION = 0.05
_SPLIT_TOLERANCE_MIN = 64 * MB


def functions(host: HostKind | None = None) -> dict[Attention, tuple[str, str]]:
    """Each registered backend ``host`` (None: both of these hosts) runs with its own functions: (UNet function
    in ``ldm_patched.ldm.modules.attention``, VAE function in ``ldm_patched.ldm.modules.diffusionmodules.model``)
    (docs/hosts.md §3.5, §3.6)."""
    out = {}
    for b in algorithms():
        binding = b.ldm_patched if host is None else b.binding(host)
        if isinstance(binding, LdmPatchedFunctions):
            out[b.name] = (binding.unet, binding.vae)
    return out


def fixed_reserve(nbytes: int) -> Callable[[], int]:
    """A stand-in for ``model_management.minimum_inference_memory`` that returns ``nbytes``."""

    def minimum_inference_memory() -> int:
        return nbytes

    minimum_inference_memory.optim_reserve = nbytes  # type: ignore[attr-defined]
    return minimum_inference_memory


class VaeAttention:
    """The VAE's attention, switched in every ``AttnBlock``-like instance of the VAEs it is shown.

    AttnBlock stores the function on the instance at construction (``self.optimized_attention``, §3.5, §3.6);
    only instances holding one of the host's VAE functions are switched, and each gets back exactly what it
    held. :meth:`ensure` is idempotent: a VAE built during the generation (another checkpoint, a changed VAE)
    is switched when it is shown at the next sampling start.
    """

    def __init__(self, host_functions: tuple[Any, ...], fn: Any) -> None:
        self.host_functions = host_functions
        self.fn = fn
        self.done: list[tuple[Any, Any]] = []  # (module, what it held)

    def ensure(self, root: Any) -> int:
        modules = getattr(root, "modules", None)
        if not callable(modules):
            return 0
        handled = {id(m) for m, _ in self.done}
        switched = 0
        for module in modules():
            held = vars(module).get("optimized_attention")
            if held is None or id(module) in handled or not any(held is f for f in self.host_functions):
                continue
            self.done.append((module, held))
            if held is not self.fn:
                module.optimized_attention = self.fn
                switched += 1
        return switched

    def restore(self) -> None:
        for module, held in reversed(self.done):
            if vars(module).get("optimized_attention") is self.fn:
                module.optimized_attention = held
        self.done.clear()


def vae_attention_name(root: Any) -> str:
    """The name of the attention function the first attention block of the VAE module ``root`` holds."""
    modules = getattr(root, "modules", None)
    if callable(modules):
        for module in modules():
            held = vars(module).get("optimized_attention")
            if callable(held):
                return str(getattr(held, "__name__", ""))
    return ""


def _backups_to(patcher: Any, host_format: Any) -> None:
    """Weight backups of ``patcher`` (``ModelPatcher.backup``: Forge previous key → tensor, reForge key →
    ``(weight, inplace_update)``, §6.5) taken while our format was on, back in the host's format: ``unpatch_model``
    puts them into the model after our restore."""
    backup = getattr(patcher, "backup", None)
    if not isinstance(backup, dict):
        return
    for key, entry in list(backup.items()):
        weight = getattr(entry, "weight", entry)
        converted = in_format(weight, host_format)
        if converted is not weight:
            backup[key] = entry._replace(weight=converted) if hasattr(entry, "_replace") else converted


class LdmPatchedAdapter(ForgeFamilyAdapter):
    """Forge previous (tag ``previous``) and reForge: ``kind`` says which (see the module doc)."""

    args_module = ARGS
    warmup_calls = WarmupCalls(  # docs/hosts.md §6.11
        prepare=("modules_forge.forge_sampler", "sampling_prepare"),
        sample=("ldm_patched.modules.samplers", "sampling_function"),
        cleanup=("modules_forge.forge_sampler", "sampling_cleanup"),
        conditions=("modules_forge.forge_sampler", "cond_from_a1111_to_patched_ldm"),
    )

    def __init__(
        self,
        kind: HostKind,
        modules: Mapping[str, ModuleType] | None = None,
        cuda_available: Callable[[], bool] | None = None,
    ) -> None:
        if kind not in HOSTS:
            allowed = ", ".join(h.value for h in HOSTS)
            raise ValueError(f"[Optim] host: {kind.value!r} does not run ldm_patched; allowed: {allowed}")
        super().__init__(modules, cuda_available)
        self.kind = kind

    def memory_management(self) -> Any:
        return self._mm()

    # --- reading ------------------------------------------------------------------------------------------

    def _mm(self, *, import_: bool = True) -> Any:
        return self._modules.get(MODEL_MANAGEMENT) if import_ else self._modules.loaded(MODEL_MANAGEMENT)

    def _directml(self) -> bool:
        return bool(getattr(self._mm(import_=False), "directml_enabled", False))

    def total_memory_mb(self) -> int | None:
        if self.generation_device_type() == "cpu" or self._directml():
            return None  # the CPU's RAM, or DirectML's constant 1 GiB (§4.8): not a GPU size
        total = getattr(self._mm(import_=False), "total_vram", None)
        return int(total) if isinstance(total, (int, float)) and total > 0 else None

    def _xformers(self) -> tuple[ModuleType | None, str]:
        args = getattr(self._modules.get(ARGS), "args", None)
        return usable_xformers(
            disabled=bool(getattr(args, "disable_xformers", False)), directml=self._directml(), cuda=self._cuda
        )

    def _host_reserve(self) -> int | None:
        """What ``minimum_inference_memory()`` returns now, in bytes (§4.6, §4.7)."""
        reserve = getattr(self._mm(import_=False), "minimum_inference_memory", None)
        if not callable(reserve):
            return None
        value = reserve()
        return int(value) if isinstance(value, (int, float)) else None

    def current_attention_name(self) -> str:
        attn = self._modules.get(ATTENTION)
        return str(getattr(getattr(attn, "optimized_attention", None), "__name__", ""))

    def attention_backends(self) -> list[BackendInfo]:
        attn = self._modules.get(ATTENTION)
        vae = self._modules.get(VAE_MODEL)
        current = getattr(getattr(attn, "optimized_attention", None), "__name__", "")
        missing = f"{ATTENTION} is not loaded" if attn is None else ""
        out = [
            BackendInfo(Attention.HOST, True, current, "as the WebUI chose at startup"),
            BackendInfo(Attention.AUTO, attn is not None, "", missing),
        ]
        directml = self._directml()
        for name, (fn_name, vae_name) in functions(self.kind).items():
            if attn is None or not callable(getattr(attn, fn_name, None)) or not callable(getattr(vae, vae_name, None)):
                out.append(BackendInfo(name, False, fn_name, missing or f"this build has no {fn_name}/{vae_name}"))
            else:
                out.append(present_backend_info(name, fn_name, directml=directml, xformers=self._xformers))
        for entry in algorithms():
            if isinstance(entry.binding(self.kind), Kernel):
                info = kernel_backend_info(entry.name, directml=directml, cuda=self._cuda)
                out.append(info if attn is not None else BackendInfo(entry.name, False, info.host_name, missing))
        return out

    def effective_state(self) -> EffectiveState:
        attn = self._modules.loaded(ATTENTION)
        mm = self._mm(import_=False)
        sd_model = loaded_sd_model(self._modules.loaded)
        unet_cl: bool | None = None
        vae_device = vae_dtype = None
        extra: dict[str, Any] = {}
        if sd_model is not None:
            unet_module = diffusion_model(sd_model)
            if unet_module is not None:
                unet_cl = bool(channels_last_state(unet_module))
            vae = getattr(sd_model.forge_objects, "vae", None)
            if vae is not None:
                vae_device = str(getattr(vae, "device", None))
                vae_dtype = dtype_name(getattr(vae, "vae_dtype", None))
                extra["vae_attention"] = vae_attention_name(getattr(vae, "first_stage_model", None))
        if mm is not None:
            extra["vae_always_tiled"] = bool(getattr(mm, "VAE_ALWAYS_TILED", False))
            vram_state = getattr(mm, "vram_state", None)
            extra["vram_state"] = getattr(vram_state, "name", str(vram_state))
        reserve = self._host_reserve()
        return EffectiveState(
            host=self.kind,
            attention=getattr(getattr(attn, "optimized_attention", None), "__name__", "") if attn else "unknown",
            unet_channels_last=unet_cl,
            vae_device=vae_device,
            vae_dtype=vae_dtype,
            inference_memory_mb=reserve // MB if reserve is not None else None,
            model_loaded=sd_model is not None,
            extra=extra,
        )

    # --- applying -----------------------------------------------------------------------------------------

    def before_sampling(self, p: Any, session: Session) -> None:
        """Idempotent. The host rebuilds ``forge_objects`` before each sampling (§7.4) as a shallow copy, which
        resets nothing of ours (module globals, the shared VAE object, the UNet's weights). Binding modules
        imported meanwhile get the attention switch, a VAE built meanwhile gets its instances switched, and conv
        weights replaced meanwhile are converted again."""
        if session.restorer.closed:
            return
        for switch in session.data.get("rebindings", ()):
            switch.ensure()
        vae_switch = session.data.get("vae_attention")
        if isinstance(vae_switch, VaeAttention):
            vae_switch.ensure(getattr(self._vae(p), "first_stage_model", None))
        fmt = session.data.get("memory_format")
        if isinstance(fmt, MemoryFormat):
            patchers = session.data.setdefault("unet_patchers", [])
            unet = self._unet_patcher(p)
            if unet is not None and all(unet is not seen for seen in patchers):
                patchers.append(unet)
            count = fmt.ensure()
            if count:
                log.debug("channels_last: re-applied to %d replaced conv weights", count)

    def _unet_patcher(self, p: Any) -> Any:
        return self._forge_object(p, "unet")

    # attention ---------------------------------------------------------------------------------------------

    def apply_attention(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        attn = self._modules.get(ATTENTION)
        vae_module = self._modules.get(VAE_MODEL)
        if attn is None or vae_module is None:
            raise NotSupportedHere(f"[Optim] attention: {ATTENTION} is not loaded; allowed: host")
        target: Attention = settings.attention
        if target is Attention.AUTO:
            target = self._auto(p, settings, session)
        restorer = session.restorer
        if isinstance(target.backend.binding(self.kind), Kernel):
            # our kernel in place of optimized_attention(_masked), with attention_pytorch's signature (reForge
            # attention.py:482); the VAE keeps what it holds (its one 512-wide head suits no kernel)
            unet_fn, vae_fn = host_attention_function(target), None
        else:
            unet_name, vae_name = functions(self.kind)[target]
            unet_fn = getattr(attn, unet_name)
            vae_fn = getattr(vae_module, vae_name)
        if target is Attention.XFORMERS:
            vae_fn = self._inject_xformers(attn, vae_module, session, vae_fn)
        elif target is Attention.SDP and self.kind is HostKind.REFORGE:
            is_amd = getattr(self._mm(), "is_amd", None)
            if callable(is_amd) and is_amd():
                # reForge keeps its VAE off SDPA on AMD: "causes crash when doing high res"
                # (pytorch_attention_enabled_vae, §3.6)
                vae_fn = vae_module.normal_attention

        # Only loaded modules are switched; one imported during the generation copies the switched function by
        # name, so every sampling start and the restore look again (Rebinding).
        switches = []
        for attribute in UNET_ATTRIBUTES:
            host_fn = getattr(attn, attribute, None)
            if host_fn is not None:
                switches.append(Rebinding(bindings_by_scan(attribute, host_fn, unet_fn), unet_fn, host_fn))
        changed = 0
        for switch in switches:
            restorer.callback(switch.restore)
            changed += switch.ensure()
        session.data["rebindings"] = switches

        vae_note = "VAE as the host has it"
        if vae_fn is not None:
            host_vae = tuple(f for f in (getattr(vae_module, n, None) for n in VAE_FUNCTIONS) if f is not None)
            vae_switch = VaeAttention(host_vae, vae_fn)
            restorer.callback(vae_switch.restore)
            vae_blocks = vae_switch.ensure(getattr(self._vae(p), "first_stage_model", None))
            session.data["vae_attention"] = vae_switch
            vae_note = f"VAE {vae_fn.__name__} ({vae_blocks} blocks switched)"

        session.attention_used = self.attention_label(unet_fn.__name__)
        restorer.notes.append(f"attention {unet_fn.__name__} ({changed} bindings switched), {vae_note}")

    def _auto(self, p: Any, settings: GenerationSettings, session: Session) -> Attention:
        available = [
            b.attention
            for b in self.attention_backends()
            if b.available and b.attention not in (Attention.HOST, Attention.AUTO)
        ]
        # load_models_gpu keeps minimum_inference_memory() free for computation (§4.6, §4.7): attention has
        # to fit in it
        memory = settings.inference_memory_mb
        if memory is None:
            reserve = self._host_reserve()
            memory = reserve // MB if reserve is not None else None
        request = base.auto_attention_request(p, self._modules.loaded("modules.devices"), budget_mb=memory)
        choice = choose_auto_attention(available, **request)
        session.data["auto_reason"] = choice.reason
        log.info("attention auto → %s", choice.reason)
        return choice.attention

    def _inject_xformers(self, attn: Any, vae_module: Any, session: Session, vae_fn: Any) -> Any:
        """The xformers functions read the module global ``xformers``, imported only when xformers was enabled
        at import (§3.5, §3.6): give both modules the module. Returns the VAE function to use."""
        xformers, why = self._xformers()
        if xformers is None:
            raise NotSupportedHere(f"[Optim] attention: 'xformers' is not available here ({why})")
        restorer = session.restorer
        for module in (attn, vae_module):
            if vars(module).get("xformers") is not xformers:
                restorer.enter(patched_attr(module, "xformers", xformers), note="xformers module injected")
        version = str(getattr(xformers, "__version__", ""))
        # attention_xformers falls back to SDPA for big batches on these versions (BROKEN_XFORMERS, set at
        # import only when xformers was enabled): Forge previous 0.0.21-0.0.23, reForge 0.0.21-0.0.29
        if self.kind is HostKind.FORGE_PREVIOUS:
            broken = version.startswith(("0.0.21", "0.0.22", "0.0.23"))
        else:
            broken = version.startswith("0.0.2") and not version.startswith("0.0.20")
        if broken != getattr(attn, "BROKEN_XFORMERS", False):
            restorer.enter(patched_attr(attn, "BROKEN_XFORMERS", broken))
        if str(getattr(getattr(xformers, "version", None), "__version__", "")).startswith("0.0.18"):
            return vae_module.pytorch_attention  # its VAE attention is broken; the hosts skip it (§3.5)
        return vae_fn

    # channels-last -----------------------------------------------------------------------------------------

    def apply_channels_last(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        target = self._channels_last_target(p, settings, session)
        if target is None:
            return
        unet, kmodel, model, fmt = target
        patchers: list[Any] = [unet]
        session.data["unet_patchers"] = patchers

        def backups_to(host_format: Any) -> None:
            for patcher in patchers:
                _backups_to(patcher, host_format)

        state = self._convert_memory_format(settings, session, model, fmt, backups_to)
        loaded_model = getattr(self._mm(), "LoadedModel", None)
        original = getattr(loaded_model, "model_load", None)
        if callable(original):
            # The samplers load the UNet after process_before_every_sampling (sampling_prepare, §4.6, §4.7),
            # and that load patches weights (LoRA) into new Parameters (§6.5): convert those too.
            @functools.wraps(original)
            def model_load_then_convert(entry: Any, *args: Any, **kwargs: Any) -> Any:
                result = original(entry, *args, **kwargs)
                if getattr(getattr(entry, "model", None), "model", None) is kmodel:
                    state.ensure()
                return result

            session.restorer.enter(patched_attr(loaded_model, "model_load", model_load_then_convert))

    # VAE on CPU --------------------------------------------------------------------------------------------

    # compile -----------------------------------------------------------------------------------------------

    def apply_compile(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        """The UNet's ResBlock/SpatialTransformer blocks compiled per generation (docs/hosts.md §6.5), keyed by
        the attention functions they read as module globals (switched just before). reForge can compile the
        whole model itself (``--torch-compile``, §4.7): then ours stays off instead of compiling twice."""
        args = getattr(self._modules.loaded(ARGS), "args", None)
        if getattr(args, "torch_compile", False):
            session.data["compile_unavailable"] = "reForge already compiles the model (--torch-compile)"
            log.warning("compile: %s; ours stays off", session.data["compile_unavailable"])
            return
        unet = getattr(getattr(self._unet_patcher(p), "model", None), "diffusion_model", None)
        if unet is None:
            log.warning("compile: no UNet loaded; nothing compiled")
            return
        attn = self._modules.loaded(ATTENTION)
        key = (getattr(attn, "optimized_attention", None), getattr(attn, "optimized_attention_masked", None))
        device = getattr(self._modules.loaded("modules.devices"), "device", "cpu")
        self.compile_blocks(session, unet, key=key, device=device, p=p, region=self.compile_region("ldm_patched", unet))
        # the VAE's AttnBlock chose its attention function at construction (an instance attribute): no key
        vae = self._vae_model(p)
        if vae is not None:
            self.compile_vae(session, vae, key=None, region=self.compile_region("ldm_patched", vae), p=p)

    # inference memory ------------------------------------------------------------------------------------

    def apply_inference_memory_mb(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        mm = self._mm()
        host_reserve = getattr(mm, "minimum_inference_memory", None)
        if not callable(host_reserve):
            raise NotSupportedHere(
                f"[Optim] inference_memory_mb: {MODEL_MANAGEMENT}.minimum_inference_memory is missing"
            )
        if settings.inference_memory_mb is None:  # begin() calls this only for a value, but mypy cannot know
            return
        ours = settings.inference_memory_mb * MB
        host = int(host_reserve())
        if ours == host:
            return
        restorer = session.restorer
        unet = self._unet_patcher(p)
        resplit = self.kind is HostKind.FORGE_PREVIOUS and unet is not None

        # Registered before the value so that it runs after the host's function is back: a UNet split under our
        # reserve would keep that split (Forge previous never re-splits a loaded model, §4.6) and could hold more
        # of the GPU than the host's reserve allows. Costs only the unload here; the reload is at the next
        # sampling, which the host's reserve needs anyway.
        def resplit_for_host() -> None:
            if resplit and self._split_would_change(mm, unet, int(mm.minimum_inference_memory())):
                unload_model(mm, unet.model)
                log.info("inference memory restored: UNet unloaded so the WebUI re-splits it at its next load")

        restorer.callback(resplit_for_host)
        restorer.enter(
            patched_unless_changed(mm, "minimum_inference_memory", fixed_reserve(ours)),
            note=f"inference memory {ours // MB} MB (host: {host // MB} MB)",
        )
        if resplit and self._split_would_change(mm, unet, ours):
            unload_model(mm, unet.model)
            restorer.notes.append("UNet unloaded to re-split it under the new inference memory")

    def _split_would_change(self, mm: Any, unet: Any, reserve: int) -> bool:
        """Would a fresh load of the loaded UNet put a different share of it on the GPU under ``reserve``?

        Mirrors Forge previous's load_models_gpu (§4.6) for a model unloaded first: whole when free − model −
        reserve ≥ 0, else ``(free − reserve) / 1.3`` of it. False when the UNet is not loaded or never split.
        """
        entry = next((e for e in mm.current_loaded_models if getattr(e.model, "model", None) is unet.model), None)
        if entry is None:
            return False
        states = getattr(mm, "VRAMState", None)
        if states is None or not getattr(mm, "lowvram_available", False):
            return False
        if getattr(mm, "vram_state", None) not in (states.LOW_VRAM, states.NORMAL_VRAM):
            return False  # HIGH_VRAM/DISABLED never split, NO_VRAM always keeps nothing on the GPU
        device = entry.device
        if getattr(device, "type", str(device)) == "cpu":
            return False
        total = mm.module_size(unet.model)
        on_gpu = total - mm.module_size(unet.model, exclude_device=device)
        free_after_unload = mm.get_free_memory(device) + on_gpu
        if free_after_unload - total - reserve >= 0:
            predicted = total
        else:
            predicted = min(total, max(0, int((free_after_unload - reserve) / 1.3)))
        tolerance = max(total * _SPLIT_TOLERANCE_FRACTION, _SPLIT_TOLERANCE_MIN)
        return abs(predicted - on_gpu) > tolerance
