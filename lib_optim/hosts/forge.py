"""WebUI Forge f2 adapter (Forge previous and reForge: :mod:`lib_optim.hosts.ldm_patched`).

Every host module (``backend.*``, ``modules.*``, ``modules_forge.*``) is imported lazily inside methods, so
this module imports without Forge. What each setting does on Forge f2, for one ``process_images`` call,
restored afterwards (the host facts, with file:line, are in docs/hosts.md):

attention
    Rebinds the host's chosen function everywhere it is bound by name — ``backend.attention`` itself and the
    copies in ``backend.nn.unet``, ``backend.nn.flux`` and ``backend.nn.chroma`` — and the VAE's single-head
    function (in ``backend.attention`` and ``backend.nn.vae``): module globals read at call time (§3.4). Not
    switched: T5 (always SDPA) and SD3's MMDiT (calls SDPA directly).
channels_last
    Converts the 4-D (conv) weights of ``forge_objects.unet.model.diffusion_model`` in place; Flux/Chroma/SD3
    have no conv weights, so nothing changes there. LoRA loading replaces patched weights with new tensors
    when the UNet is (re)loaded inside the sampler (§6.4), so the model's ``LoraLoader.refresh`` is wrapped
    to re-apply the format after it runs.
vae_on_cpu
    Unloads the VAE from the GPU and runs encode/decode on the CPU in float32 (slow: seconds to tens of
    seconds per image on the CPU). The built-in "Never OOM" script's ``VAE_ALWAYS_TILED`` switch is left alone
    (it sets it in its own ``process()`` every generation, §5.4); tiled decoding works on the CPU too.
inference_memory_mb
    Sets ``memory_management.current_inference_memory`` (bytes) for the generation, and unloads the UNet once
    when it is loaded and the new budget would change its GPU/CPU split (Forge never re-splits a loaded
    model, §4.3). Not through ``opts``/``set_config``: that sets ``processing.need_global_unload`` and
    unloads every model, this request and after restoring (§4.4, §4.5).

§ = a section of docs/hosts.md.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from lib_optim.adapter import BackendInfo, EffectiveState, NotSupportedHere, Session
from lib_optim.attention import Attention, Kernel, algorithms, choose_auto_attention, host_attention_function
from lib_optim.host_specs import HostKind
from lib_optim.hosts import base
from lib_optim.hosts.forge_shared import (
    MB,
    ForgeFamilyAdapter,
    MemoryFormat,
    Rebinding,
    WarmupCalls,
    channels_last_state,
    diffusion_model,
    dtype_name,
    in_format,
    kernel_backend_info,
    listed_bindings,
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


def functions() -> dict[Attention, tuple[str, str]]:
    """Each registered backend Forge f2 has: its (UNet/DiT function, VAE single-head spatial function) in
    ``backend.attention`` (docs/hosts.md §3.4)."""
    return {b.name: (b.forge.unet, b.forge.vae) for b in algorithms() if b.forge is not None}


# Every module global the UNet/DiT function is bound to (docs/hosts.md §3.4).
_UNET_BINDINGS = (
    ("backend.attention", "attention_function"),
    ("backend.nn.unet", "attention_function"),
    ("backend.nn.flux", "attention_function"),
    ("backend.nn.chroma", "attention_function"),
)
_VAE_BINDINGS = (
    ("backend.attention", "attention_function_single_head_spatial"),
    ("backend.nn.vae", "attention_function_single_head_spatial"),
)

# A predicted GPU share of the UNet within this much of the current one counts as "the same split": Forge
# splits by whole modules (§4.3), so the prediction is only that precise.
_SPLIT_TOLERANCE_FRACTION = 0.05
_SPLIT_TOLERANCE_MIN = 64 * MB


def _lora_backups_to(loader: Any, host_format: Any) -> None:
    """LoRA backups copied to another device after our conversion keep its format (§6.4); put them back in
    the host's format so that removing the LoRA later restores the host's layout."""
    backup = getattr(loader, "backup", None)
    if isinstance(backup, dict):
        for key, weight in list(backup.items()):
            backup[key] = in_format(weight, host_format)


class ForgeAdapter(ForgeFamilyAdapter):
    kind = HostKind.FORGE
    args_module = "backend.args"
    own_vae_choice = "Forge's own choice at load"  # docs/hosts.md §5.3
    warmup_calls = WarmupCalls(  # docs/hosts.md §6.11
        prepare=("backend.sampling.sampling_function", "sampling_prepare"),
        sample=("backend.sampling.sampling_function", "sampling_function_inner"),
        cleanup=("backend.sampling.sampling_function", "sampling_cleanup"),
        conditions=("backend.sampling.condition", "compile_conditions"),
    )

    def memory_management(self) -> Any:
        return self._modules.get("backend.memory_management")

    # --- reading ------------------------------------------------------------------------------------------

    def total_memory_mb(self) -> int | None:
        mm = self._modules.loaded("backend.memory_management")
        total = getattr(mm, "total_vram", None)
        return int(total) if isinstance(total, (int, float)) and total > 0 else None

    def _xformers(self) -> tuple[ModuleType | None, str]:
        """The xformers module if it can run here, else None and why."""
        backend_args = getattr(self._modules.get("backend.args"), "args", None)
        mm = self._modules.get("backend.memory_management")
        return usable_xformers(
            disabled=bool(getattr(backend_args, "disable_xformers", False)),
            directml=bool(getattr(mm, "directml_enabled", False)),
            cuda=self._cuda,
        )

    def attention_backends(self) -> list[BackendInfo]:
        attn = self._modules.get("backend.attention")
        current = getattr(getattr(attn, "attention_function", None), "__name__", "")
        out = [
            BackendInfo(Attention.HOST, True, current, "as Forge chose at startup"),
            BackendInfo(Attention.AUTO, attn is not None, "", "" if attn is not None else "backend.attention missing"),
        ]
        directml = bool(getattr(self._modules.loaded("backend.memory_management"), "directml_enabled", False))
        for name, (fn_name, _vae) in functions().items():
            if attn is None or not callable(getattr(attn, fn_name, None)):
                out.append(BackendInfo(name, False, fn_name, "backend.attention does not have it"))
                continue
            out.append(present_backend_info(name, fn_name, directml=directml, xformers=self._xformers))
        for entry in algorithms():
            if isinstance(entry.binding(self.kind), Kernel):
                out.append(kernel_backend_info(entry.name, directml=directml, cuda=self._cuda))
        return out

    def effective_state(self) -> EffectiveState:
        attn = self._modules.loaded("backend.attention")
        mm = self._modules.loaded("backend.memory_management")
        sd_model = loaded_sd_model(self._modules.loaded)
        unet_cl: bool | None = None
        vae_device = vae_dtype = None
        if sd_model is not None:
            unet_module = diffusion_model(sd_model)
            if unet_module is not None:
                unet_cl = bool(channels_last_state(unet_module))
            vae = getattr(getattr(sd_model, "forge_objects", None), "vae", None)
            if vae is not None:
                vae_device = str(getattr(vae, "device", None))
                vae_dtype = dtype_name(getattr(vae, "vae_dtype", None))
        extra: dict[str, Any] = {}
        if attn is not None:
            vae_fn = getattr(attn, "attention_function_single_head_spatial", None)
            extra["vae_attention"] = getattr(vae_fn, "__name__", "")
        if mm is not None:
            extra["vae_always_tiled"] = bool(getattr(mm, "VAE_ALWAYS_TILED", False))
            vram_state = getattr(mm, "vram_state", None)
            extra["vram_state"] = getattr(vram_state, "name", str(vram_state))
        memory = getattr(mm, "current_inference_memory", None) if mm is not None else None
        return EffectiveState(
            host=self.kind,
            attention=getattr(getattr(attn, "attention_function", None), "__name__", "") if attn else "unknown",
            unet_channels_last=unet_cl,
            vae_device=vae_device,
            vae_dtype=vae_dtype,
            inference_memory_mb=int(memory // MB) if isinstance(memory, (int, float)) else None,
            model_loaded=sd_model is not None,
            extra=extra,
        )

    # --- applying -----------------------------------------------------------------------------------------

    def current_attention_name(self) -> str:
        attn = self._modules.get("backend.attention")
        return str(getattr(getattr(attn, "attention_function", None), "__name__", ""))

    def before_sampling(self, p: Any, session: Session) -> None:
        """Idempotent. Nothing of ours lives on ``forge_objects`` (module globals, the shared VAE object and
        the UNet's weights are what we change), so the rebuild before each sampling (§7.4) resets nothing;
        only conv weights replaced meanwhile are converted again, and a binding module the host imported
        meanwhile (Flux/Chroma load lazily) gets the attention switch too."""
        for switch in session.data.get("rebindings", ()):
            if not session.restorer.closed:
                switch.ensure()
        fmt = session.data.get("memory_format")
        if isinstance(fmt, MemoryFormat) and not session.restorer.closed:
            count = fmt.ensure()
            if count:
                log.debug("channels_last: re-applied to %d replaced conv weights", count)

    # attention ---------------------------------------------------------------------------------------------

    def apply_attention(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        attn = self._modules.get("backend.attention")
        if attn is None:
            raise NotSupportedHere("[Optim] attention: backend.attention is missing; allowed: host")
        target: Attention = settings.attention
        if target is Attention.AUTO:
            available = [
                b.attention
                for b in self.attention_backends()
                if b.available and b.attention not in (Attention.HOST, Attention.AUTO)
            ]
            # Forge keeps its inference memory free for sampling (§4.3): attention
            # has to fit in it, whatever is free before the UNet loads
            mm = self._modules.loaded("backend.memory_management")
            memory = settings.inference_memory_mb
            if memory is None:
                current = getattr(mm, "current_inference_memory", None) if mm is not None else None
                memory = int(current // MB) if isinstance(current, (int, float)) else None
            request = base.auto_attention_request(p, self._modules.loaded("modules.devices"), budget_mb=memory)
            choice = choose_auto_attention(available, **request)
            target = choice.attention
            session.data["auto_reason"] = choice.reason
            log.info("attention auto → %s", choice.reason)
        restorer = session.restorer
        if isinstance(target.backend.binding(self.kind), Kernel):
            # our kernel in place of the UNet's attention_function, with its signature (backend/attention.py:324);
            # the VAE keeps the host's function (its one 512-wide head suits no kernel)
            unet_fn = host_attention_function(target)
            vae_fn = getattr(attn, "attention_function_single_head_spatial", None)
        else:
            unet_name, vae_name = functions()[target]
            unet_fn = getattr(attn, unet_name)
            vae_fn = getattr(attn, vae_name)

        if target is Attention.XFORMERS:
            xformers, why = self._xformers()
            if xformers is None:
                raise NotSupportedHere(f"[Optim] attention: 'xformers' is not available here ({why})")
            # attention.py imports xformers only if it was enabled at startup (:10-19); the functions read
            # the module global `xformers` at call time, so give them the module.
            if vars(attn).get("xformers") is not xformers:
                restorer.enter(patched_attr(attn, "xformers", xformers), note="xformers module injected")
                version = str(getattr(xformers, "__version__", ""))
                broken = version.startswith("0.0.2") and not version.startswith("0.0.20")  # docs/hosts.md §3.3
                if broken != getattr(attn, "BROKEN_XFORMERS", False):
                    restorer.enter(patched_attr(attn, "BROKEN_XFORMERS", broken))
            version = str(getattr(getattr(xformers, "version", None), "__version__", ""))
            if version.startswith("0.0.18"):  # its VAE attention is broken (§3.3)
                vae_fn = attn.pytorch_attention_single_head_spatial

        # Only modules the host has imported are switched (importing Flux/Chroma ourselves would change what
        # is loaded); one imported during the generation copies the switched function by name, so every
        # sampling start and the restore look again (Rebinding).
        switches = [
            Rebinding(
                listed_bindings(self._modules, _UNET_BINDINGS), unet_fn, getattr(attn, "attention_function", None)
            ),
            Rebinding(
                listed_bindings(self._modules, _VAE_BINDINGS),
                vae_fn,
                getattr(attn, "attention_function_single_head_spatial", None),
            ),
        ]
        changed = 0
        for switch in switches:
            restorer.callback(switch.restore)
            changed += switch.ensure()
        session.data["rebindings"] = switches
        session.attention_used = self.attention_label(unet_fn.__name__)
        vae_label = getattr(vae_fn, "__name__", "the host's VAE attention")
        restorer.notes.append(f"attention {unet_fn.__name__}/{vae_label} ({changed} bindings switched)")

    # channels-last -----------------------------------------------------------------------------------------

    def apply_channels_last(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        target = self._channels_last_target(p, settings, session)
        if target is None:
            return
        _patcher, kmodel, model, fmt = target
        loader = getattr(kmodel, "lora_loader", None)
        state = self._convert_memory_format(
            settings, session, model, fmt, lambda host_format: _lora_backups_to(loader, host_format)
        )
        refresh = getattr(loader, "refresh", None)
        if callable(refresh):
            # model_load → refresh_loras (§6.4) replaces LoRA-patched weights with new
            # Parameters (§6.4) after process_before_every_sampling has run: convert those too.
            def refresh_then_convert(*args: Any, **kwargs: Any) -> Any:
                result = refresh(*args, **kwargs)
                state.ensure()
                return result

            session.restorer.enter(patched_attr(loader, "refresh", refresh_then_convert))

    # compile -----------------------------------------------------------------------------------------------

    def apply_compile(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        """The diffusion model's repeated blocks (SD1.x/SDXL ResBlock/SpatialTransformer, Flux/Chroma double and
        single stream blocks; docs/hosts.md §6.3), compiled per generation. The key is the attention function
        the blocks look up by name (switched just before, §3.4): on the torch Forge ships, dynamo does not
        notice a rebound module global (lib_optim.compile.regional)."""
        model = diffusion_model(getattr(p, "sd_model", None))
        if model is None:
            log.warning("compile: no diffusion model loaded; nothing compiled")
            return
        key = tuple(
            getattr(self._modules.loaded(name), attr, None)
            for name, attr in _UNET_BINDINGS
            if name != "backend.nn.chroma"
        )
        device = getattr(self._modules.loaded("modules.devices"), "device", "cpu")
        self.compile_blocks(session, model, key=key, device=device, p=p, region=self.compile_region("forge", model))
        vae_key = getattr(self._modules.loaded("backend.nn.vae"), "attention_function_single_head_spatial", None)
        vae = self._vae_model(p)
        if vae is not None:
            self.compile_vae(session, vae, key=vae_key, region=self.compile_region("forge", vae), p=p)

    # inference memory ------------------------------------------------------------------------------------

    def apply_inference_memory_mb(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        mm = self._modules.get("backend.memory_management")
        if mm is None:
            raise NotSupportedHere("[Optim] inference_memory_mb: backend.memory_management is missing")
        if settings.inference_memory_mb is None:  # begin() calls this only for a value, but mypy cannot know
            return
        ours = settings.inference_memory_mb * MB
        host = int(mm.current_inference_memory)
        if ours == host:
            return
        unet = getattr(getattr(p.sd_model, "forge_objects", None), "unet", None)
        restorer = session.restorer

        # Registered before the value so that it runs after the host's value is back. This is the second
        # reload: Forge never re-splits a model that is already loaded (§4.3), so a
        # UNet split under our budget would keep that split in the next generations. It is needed when the
        # split would change under the host's budget — with our smaller budget it holds more weights on the
        # GPU than the host allows, and the host's next sampling could run out of memory. It costs only the
        # unload here; the reload happens at the next sampling, which is the reload the host's budget
        # needs anyway. Avoided when the split would not change (e.g. the model fits on the GPU under both).
        def resplit_for_host() -> None:
            if unet is not None and self._split_would_change(mm, unet, int(mm.current_inference_memory)):
                unload_model(mm, unet.model)
                log.info("inference memory restored: UNet unloaded so Forge re-splits it at its next load")

        restorer.callback(resplit_for_host)
        restorer.enter(
            patched_unless_changed(mm, "current_inference_memory", ours),
            note=f"inference memory {ours // MB} MB (host: {host // MB} MB)",
        )
        # The new value is read by the next load_models_gpu (:618-619) to free other models, but the UNet's
        # GPU/CPU split is fixed at its load: unload it once (here, before sampling loads it) if it changes.
        if unet is not None and self._split_would_change(mm, unet, ours):
            unload_model(mm, unet.model)
            restorer.notes.append("UNet unloaded to re-split it under the new inference memory")

    def _split_would_change(self, mm: Any, unet: Any, budget: int) -> bool:
        """Would a fresh load of the loaded UNet put a different share of it on the GPU under ``budget``?

        Mirrors load_models_gpu's decision (§4.3) for a model that was fully
        unloaded first (so ``previously_loaded`` is 0, :678-679). False when the UNet is not loaded.
        """
        entry = next((e for e in mm.current_loaded_models if getattr(e.model, "model", None) is unet.model), None)
        if entry is None:
            return False
        vram_state = getattr(mm, "vram_state", None)
        states = getattr(mm, "VRAMState", None)
        if states is None or not getattr(mm, "lowvram_available", False):
            return False
        if vram_state not in (states.LOW_VRAM, states.NORMAL_VRAM):
            return False  # HIGH_VRAM/SHARED/DISABLED never split, NO_VRAM always swaps all (:667, :681-682)
        device = entry.device
        if getattr(device, "type", str(device)) == "cpu":
            return False
        total = mm.module_size(unet.model)
        on_gpu = mm.module_size(unet.model, include_device=device)
        free_after_unload = mm.get_free_memory(device) + on_gpu
        inference = budget + int(getattr(unet, "extra_preserved_memory_during_sampling", 0) or 0)
        if free_after_unload - total - inference >= 0:
            predicted = total
        else:
            predicted = min(total, mm.compute_model_gpu_memory_when_using_cpu_swap(free_after_unload, inference))
        tolerance = max(total * _SPLIT_TOLERANCE_FRACTION, _SPLIT_TOLERANCE_MIN)
        return abs(predicted - on_gpu) > tolerance
