"""AUTOMATIC1111 WebUI v1.10.1 adapter.

Every host module (``modules.*``, ``ldm.*``, ``sgm.*``, ``launch``) is imported lazily inside methods, so this
module imports without a WebUI. What each setting does on A1111, for one ``process_images`` call, restored
afterwards (the host facts, with file:line, are in docs/hosts.md; § = one of its sections):

attention
    Switches the cross-attention optimizer with ``modules.sd_hijack.apply_optimizations(title)``: the class
    attributes ``CrossAttention.forward`` and ``AttnBlock.forward`` of ``ldm`` and ``sgm`` (SD1/SD2/SDXL UNet
    cross-attention and VAE attention of every loaded model), plus ``nonlinearity`` and ``openaimodel.th``
    (§3.2). The exact title is checked against ``sd_hijack.optimizers`` first: for a title it does not know,
    A1111 silently applies its top optimizer. For the generation, ``opts.data["cross_attention_optimization"]``
    holds the title too (no callbacks: the setting's onchange takes the queue lock), so a model reload during
    the generation — per batch, or the refiner switch (§6.6) — re-applies our choice. Restored by putting
    back the exact objects saved before the switch, not by re-applying the old optimizer, which leaves
    different bindings (sgm's ``AttnBlock.forward`` differs after ``undo_optimizations`` and after
    ``SdOptimization.undo``, §3.2). Not switched: SD3, which calls ``scaled_dot_product_attention`` directly.
channels_last
    Converts the UNet (``sd_model.model.diffusion_model``) with ``.to(memory_format=...)`` when its format
    differs, and back afterwards. A checkpoint loaded during the generation (refiner, hires checkpoint) is not
    converted.
vae_on_cpu
    Moves ``sd_model.first_stage_model`` to the CPU in float32 and wraps the model instance's
    ``decode_first_stage``/``encode_first_stage`` so they run there; ``devices.dtype_vae`` is float32 for the
    generation (the encode path re-casts the VAE to it, §5.1). Slow (seconds per image), and live previews
    with the "Full" method decode on the CPU too. Skipped with a warning under ``--medvram``/``--lowvram``
    (their wrappers move the VAE to the GPU on use, §4.1). A refiner or hires checkpoint swapped in during the
    generation decodes as the host does.
inference_memory_mb
    Forge only; ignored here with a warning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lib_optim.adapter import BackendInfo, EffectiveState, NotSupportedHere, Session
from lib_optim.attention import A1111_NONE_TITLE, Attention, Kernel, algorithms, choose_auto_attention, sdpa_with_kernel
from lib_optim.compile import CompileRegion
from lib_optim.host_specs import HostKind
from lib_optim.hosts import base, compile_regions
from lib_optim.hosts.base import HostBase, HostModules
from lib_optim.log import get_logger
from lib_optim.patching import Restorer, patched_attr, patched_item
from lib_optim.settings import GenerationSettings, Tri, VaeTiling
from lib_optim.vae import tile_vae

log = get_logger(__name__)

SETTING_KEY = "cross_attention_optimization"  # docs/hosts.md §3.2
NONE_TITLE = A1111_NONE_TITLE  # handled by apply_optimizations itself, never in the optimizer list


def titles() -> dict[Attention, str]:
    """Our names → A1111's optimizer titles, from the registry (title() = "name" or "name - label")."""
    return {b.name: b.a1111.title for b in algorithms() if b.a1111 is not None}


_NOT_LISTED_YET = "the WebUI has not listed its attention optimizers yet (startup is not finished)"

# Everything apply_optimizations / undo_optimizations / SdOptimization.apply/undo rebind
# (docs/hosts.md §3.2): (module, class or None, attribute).
_ATTENTION_BINDINGS: tuple[tuple[str, str | None, str], ...] = (
    ("ldm.modules.attention", "CrossAttention", "forward"),
    ("ldm.modules.diffusionmodules.model", "AttnBlock", "forward"),
    ("ldm.modules.diffusionmodules.model", None, "nonlinearity"),
    ("ldm.modules.diffusionmodules.openaimodel", None, "th"),
    ("sgm.modules.attention", "CrossAttention", "forward"),
    ("sgm.modules.diffusionmodules.model", "AttnBlock", "forward"),
    ("sgm.modules.diffusionmodules.model", None, "nonlinearity"),
    ("sgm.modules.diffusionmodules.openaimodel", None, "th"),
)

_MISSING = object()


# --- small helpers ------------------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _first_floating(module: Any) -> Any:
    """The first floating-point parameter of ``module`` (its device/dtype stand for the module's), or None."""
    for param in module.parameters():
        if param.is_floating_point():
            return param
    return None


def _memory_format_of(module: Any) -> Any:
    """torch.channels_last / torch.contiguous_format from the first 4-D weight whose layout tells them apart
    (a 1×1 kernel is both at once); None when the module has no such weight."""
    import torch

    for param in module.parameters():
        if param.dim() != 4:
            continue
        cl = param.is_contiguous(memory_format=torch.channels_last)
        plain = param.is_contiguous()
        if cl and not plain:
            return torch.channels_last
        if plain and not cl:
            return torch.contiguous_format
    return None


def _on_meta(module: Any) -> bool:
    """True when the module's weights were sent to the meta device (sd_models.send_model_to_trash)."""
    param = _first_floating(module)
    return param is not None and param.device.type == "meta"


def _diffusion_model(sd_model: Any) -> Any:
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


@contextlib.contextmanager
def _saved_bindings(targets: list[tuple[Any, str]]) -> Iterator[None]:
    """Remember what each ``obj.__dict__[name]`` holds now; put back exactly those objects on exit.

    Entered *before* the host rebinds them, so that restoring is exact whatever the host does meanwhile
    (apply_optimizations, a model reload re-applying them, an exception half-way).
    """
    saved = [(obj, name, vars(obj).get(name, _MISSING)) for obj, name in targets]
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            elif vars(obj).get(name, _MISSING) is not value:
                setattr(obj, name, value)


def _move_tensors(value: Any, device: Any, dtype: Any) -> Any:
    """``value`` with its floating tensors on ``device`` as ``dtype``: tensors, lists/tuples/dicts of them, and
    objects holding tensors as attributes — the posterior ``encode_first_stage`` returns for SD1/SD2
    (``DiagonalGaussianDistribution``: parameters, mean, logvar, std, var; stablediffusion
    §5.1) is moved in place."""
    import torch

    def move(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)
        return t

    if isinstance(value, torch.Tensor):
        return move(value)
    if isinstance(value, (list, tuple)):
        moved = [_move_tensors(v, device, dtype) for v in value]
        return type(value)(moved) if isinstance(value, list) else tuple(moved)
    if isinstance(value, dict):
        return {k: _move_tensors(v, device, dtype) for k, v in value.items()}
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict):
        for key, attr in list(attrs.items()):
            if isinstance(attr, torch.Tensor):
                attrs[key] = move(attr)
    return value


class _CpuVae:
    """The VAE of one model on the CPU for one generation (docs/hosts.md §5.1, §5.2), restorable exactly."""

    def __init__(self, sd_model: Any, devices: Any) -> None:
        import torch

        self.sd_model = sd_model
        self.devices = devices
        self.vae = sd_model.first_stage_model
        first = _first_floating(self.vae)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None else torch.float32
        # every floating tensor's dtype, to restore a VAE that was not all one dtype exactly
        self.dtypes = {
            name: t.dtype
            for name, t in (*self.vae.named_parameters(), *self.vae.named_buffers())
            if t.is_floating_point()
        }
        self.host_dtype_vae = getattr(devices, "dtype_vae", None)
        self.dtype_vae_set = False

    def set_dtype_vae(self) -> None:
        import torch

        if self.devices is not None:
            self.devices.dtype_vae = torch.float32
            self.dtype_vae_set = True

    def make_wrapper(self, bound: Callable[..., Any]) -> Callable[..., Any]:
        """Run ``bound`` (the instance's decode_first_stage / encode_first_stage) on the CPU VAE: tensor inputs go
        to the CPU in the VAE's dtype, the result comes back on the device and in the dtype of the first tensor
        input (what the caller works with)."""
        import torch

        cpu = torch.device("cpu")

        def on_cpu(*args: Any, **kwargs: Any) -> Any:
            vae = self.sd_model.first_stage_model
            param = _first_floating(vae)
            if param is not None and param.device.type != "cpu":
                # A reload of the same instance moved the whole model to the GPU (§6.6).
                vae.to(cpu)
                param = _first_floating(vae)
            dtype = param.dtype if param is not None else torch.float32
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            args = tuple(_move_tensors(a, cpu, dtype) for a in args)
            kwargs = {k: _move_tensors(v, cpu, dtype) for k, v in kwargs.items()}
            result = bound(*args, **kwargs)
            if first is None:
                return result
            return _move_tensors(result, first.device, first.dtype if first.is_floating_point() else dtype)

        on_cpu.__wrapped__ = bound  # type: ignore[attr-defined]
        return on_cpu

    def restore(self) -> None:
        """Put the host's ``dtype_vae`` back, then the VAE on its device in its dtypes.

        If the host changed ``dtype_vae`` during the generation (the NaN auto-fix switches it to bfloat16 and
        casts the VAE, §5.2 — meant to persist), its choice stays and only the device is
        restored."""
        import torch

        now = getattr(self.devices, "dtype_vae", None)
        ours = not self.dtype_vae_set or now == torch.float32
        if self.dtype_vae_set and ours:
            self.devices.dtype_vae = self.host_dtype_vae
        elif not ours:
            log.info("vae_on_cpu: the WebUI switched dtype_vae to %s during the generation; keeping it", now)
        vae = self.vae
        if _on_meta(vae):
            return  # the model was unloaded meanwhile (send_model_to_trash, §5.2)
        if ours:
            # cast on the CPU first (half the bytes to move), through Module.to so that Lightning's
            # `first_stage_model.dtype` (read by the encode path, §5.1) follows
            vae.to(dtype=self.dtype)
            tensors = dict((*vae.named_parameters(), *vae.named_buffers()))
            for name, dtype in self.dtypes.items():
                if name in tensors and tensors[name].dtype != dtype:
                    tensors[name].data = tensors[name].data.to(dtype)
        vae.to(self.device)


# --- the adapter -----------------------------------------------------------------------------------------------


class A1111Adapter(HostBase):
    kind = HostKind.A1111

    def __init__(self, modules: Mapping[str, Any] | None = None) -> None:
        """``modules``: host modules by their import name ("modules.shared", "ldm.modules.attention", ...) to use
        instead of the real ones (tests)."""
        self._modules = HostModules(modules)
        self._version: str | None = None

    # --- reading ------------------------------------------------------------------------------------------

    def version(self) -> str:
        """``launch.git_tag()`` (what the footer and infotext show, §8.3), cached: it
        runs ``git describe``."""
        if self._version is None:
            tag = ""
            for name in ("launch", "modules.launch_utils"):
                module = self._modules.get(name)
                git_tag = getattr(module, "git_tag", None)
                if callable(git_tag):
                    with contextlib.suppress(Exception):
                        tag = str(git_tag())
                    break
            self._version = tag
        return self._version

    def optimizer_titles(self) -> list[str]:
        """The titles of the optimizers the WebUI listed at startup (§3.1), priority order."""
        sd_hijack = self._modules.get("modules.sd_hijack")
        titles = []
        for opt in getattr(sd_hijack, "optimizers", None) or []:
            with contextlib.suppress(Exception):
                titles.append(str(opt.title()))
        return titles

    def attention_backends(self) -> list[BackendInfo]:
        titles = self.optimizer_titles()
        shared = self._modules.get("modules.shared")
        setting = str(getattr(getattr(shared, "opts", None), "data", {}).get(SETTING_KEY, "Automatic"))
        out = [
            BackendInfo(Attention.HOST, True, setting, "as Settings → Optimizations → Cross attention optimization"),
            BackendInfo(Attention.AUTO, bool(titles), "", "" if titles else _NOT_LISTED_YET),
        ]
        for entry in algorithms():
            if isinstance(entry.binding(HostKind.A1111), Kernel):
                out.append(self._kernel_info(entry.name, titles))
                continue
            if entry.a1111 is None:
                continue
            title = entry.a1111.title
            if title == NONE_TITLE:
                out.append(BackendInfo(entry.name, True, title, "no optimization: the models' own attention"))
            elif title in titles:
                out.append(BackendInfo(entry.name, True, title))
            else:
                out.append(BackendInfo(entry.name, False, title, entry.a1111.missing if titles else _NOT_LISTED_YET))
        return out

    def _kernel_info(self, name: Attention, listed: list[str]) -> BackendInfo:
        """A kernel we call ourselves runs inside the sdp optimizer (:meth:`apply_attention`): available when
        the WebUI lists sdp and the kernel can run on this device (its registry entry's reason, naming the fix)."""
        import torch

        sdp_title = titles()[Attention.SDP]
        if sdp_title not in listed:
            why = f"runs inside the {sdp_title!r} optimizer, which " + (
                "the WebUI does not list" if listed else "is not listed yet (startup is not finished)"
            )
            return BackendInfo(name, False, name.value, why)
        reason = name.backend.unavailable_reason("cuda" if torch.cuda.is_available() else "cpu")
        return BackendInfo(name, not reason, name.value, reason)

    def _loaded_sd_model(self) -> Any:
        """The loaded model or None — never ``shared.sd_model``, whose getter loads one (§7.1)."""
        sd_models = self._modules.loaded("modules.sd_models")
        return getattr(getattr(sd_models, "model_data", None), "sd_model", None)

    def effective_state(self) -> EffectiveState:
        import torch

        sd_hijack = self._modules.loaded("modules.sd_hijack")
        shared = self._modules.loaded("modules.shared")
        devices = self._modules.loaded("modules.devices")
        if sd_hijack is None:
            attention = "unknown"
        else:
            current = getattr(sd_hijack, "current_optimizer", None)
            attention = str(getattr(current, "name", "") or "none") if current is not None else "none"
        sd_model = self._loaded_sd_model()
        unet_cl: bool | None = None
        vae_device = vae_dtype = None
        extra: dict[str, Any] = {}
        if sd_model is not None:
            with contextlib.suppress(Exception):
                unet = _diffusion_model(sd_model)
                if unet is not None:
                    unet_cl = _memory_format_of(unet) == torch.channels_last
            vae = getattr(sd_model, "first_stage_model", None)
            if vae is not None:
                param = _first_floating(vae)
                if param is not None:
                    vae_device, vae_dtype = str(param.device), _dtype_name(param.dtype)
            extra["lowvram"] = bool(getattr(sd_model, "lowvram", False))
        if shared is not None:
            extra["cross_attention_optimization"] = getattr(getattr(shared, "opts", None), "data", {}).get(SETTING_KEY)
        if devices is not None:
            extra["dtype_vae"] = _dtype_name(getattr(devices, "dtype_vae", None))
        if sd_hijack is not None:
            extra["optimizers"] = self.optimizer_titles()
        return EffectiveState(
            host=self.kind,
            attention=attention,
            unet_channels_last=unet_cl,
            vae_device=vae_device,
            vae_dtype=vae_dtype,
            inference_memory_mb=None,
            model_loaded=sd_model is not None,
            extra=extra,
        )

    # --- applying -----------------------------------------------------------------------------------------

    def current_attention_name(self) -> str:
        current = getattr(self._modules.get("modules.sd_hijack"), "current_optimizer", None)
        return str(getattr(current, "name", "")) if current is not None else NONE_TITLE

    # attention ---------------------------------------------------------------------------------------------

    def apply_attention(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        target = self._resolve_target(p, settings, session)
        if not isinstance(target.backend.binding(HostKind.A1111), Kernel):
            session.attention_used = self.attention_label(self.switch_optimizer(session.restorer, titles()[target]))
            return
        # A kernel we call ourselves: the sdp optimizer's forward calls torch.nn.functional.
        # scaled_dot_product_attention at call time with (batch, heads, tokens, dim_head) tensors
        # (modules/sd_hijack_optimizations.py:524-537); for this generation that function runs the kernel
        # (calls it cannot take run SDPA, lib_optim.attention.kernels).
        import torch

        self.switch_optimizer(session.restorer, titles()[Attention.SDP])
        functional = torch.nn.functional
        wrapper = sdpa_with_kernel(target, functional.scaled_dot_product_attention)
        session.restorer.enter(
            patched_attr(functional, "scaled_dot_product_attention", wrapper),
            note=f"attention {target.value} inside the sdp optimizer (SDPA wrapped)",
        )
        session.attention_used = target.value

    def _resolve_target(self, p: Any, settings: GenerationSettings, session: Session) -> Attention:
        """The backend ``settings.attention`` stands for (``auto`` resolved); NotSupportedHere if not available."""
        backends = self.attention_backends()
        target = settings.attention
        if target is Attention.AUTO:
            available = [
                b.attention
                for b in backends
                if b.available and b.attention not in (Attention.HOST, Attention.AUTO, Attention.NONE)
            ]
            if not available:
                raise NotSupportedHere(f"[Optim] attention: 'auto' is not available here ({_NOT_LISTED_YET})")
            devices = self._modules.loaded("modules.devices")
            choice = choose_auto_attention(available, **base.auto_attention_request(p, devices))
            target = choice.attention
            session.data["auto_reason"] = choice.reason
            log.info("attention auto → %s", choice.reason)
        info = next((b for b in backends if b.attention is target), None)
        if info is None or not info.available:
            allowed = ", ".join(b.attention.value for b in backends if b.available)
            why = f" ({info.reason})" if info is not None and info.reason else ""
            raise NotSupportedHere(
                f"[Optim] attention: {target.value!r} is not available here{why}; allowed: {allowed}"
            )
        return target

    def _binding_targets(self) -> list[tuple[Any, str]]:
        targets: list[tuple[Any, str]] = []
        for module_name, class_name, attr in _ATTENTION_BINDINGS:
            module = self._modules.get(module_name)
            if module is None:
                continue
            owner = getattr(module, class_name, None) if class_name else module
            if owner is not None:
                targets.append((owner, attr))
        sd_hijack = self._modules.get("modules.sd_hijack")
        targets.append((sd_hijack, "current_optimizer"))
        model_hijack = getattr(sd_hijack, "model_hijack", None)
        if model_hijack is not None:
            targets.append((model_hijack, "optimization_method"))
        return targets

    def switch_optimizer(self, restorer: Restorer, title: str) -> str:
        """Apply the optimizer with exactly this title (or "None") for the generation held by ``restorer``.

        Returns the optimizer's name ("None" for none). Raises NotSupportedHere, changing nothing, for a title
        the WebUI did not list — A1111 itself would apply its top optimizer instead (§3.2).
        """
        sd_hijack = self._modules.get("modules.sd_hijack")
        shared = self._modules.get("modules.shared")
        if sd_hijack is None or shared is None:
            raise NotSupportedHere("[Optim] attention: modules.sd_hijack is missing; allowed: host")
        titles = self.optimizer_titles()
        if title != NONE_TITLE and title not in titles:
            allowed = ", ".join([*titles, NONE_TITLE])
            raise NotSupportedHere(f"[Optim] attention: {title!r} is not an optimizer title here; allowed: {allowed}")
        current = getattr(sd_hijack, "current_optimizer", None)
        old_setting = shared.opts.data.get(SETTING_KEY, "Automatic")
        # saved before anything changes: restore puts back these exact objects
        restorer.enter(_saved_bindings(self._binding_targets()))
        # reloads during the generation re-apply the setting's value (§3.2)
        restorer.enter(
            patched_item(shared.opts.data, SETTING_KEY, title),
            note=f"attention {title!r} (WebUI setting: {old_setting!r})",
        )
        if current is not None and title != NONE_TITLE and current.title() == title:
            return str(current.name)
        name = sd_hijack.apply_optimizations(title)
        model_hijack = getattr(sd_hijack, "model_hijack", None)
        if model_hijack is not None:
            model_hijack.optimization_method = name  # what model_hijack.apply_optimizations stores (:186)
        return str(name) if name else NONE_TITLE

    # channels-last -----------------------------------------------------------------------------------------

    def apply_channels_last(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        import torch

        unet = _diffusion_model(getattr(p, "sd_model", None))
        if unet is None:
            log.warning("channels_last: no UNet loaded; nothing changed")
            return
        want = torch.channels_last if settings.channels_last is Tri.ON else torch.contiguous_format
        have = _memory_format_of(unet)
        label = "channels_last" if want == torch.channels_last else "contiguous"
        if have is None:
            session.restorer.notes.append("channels_last: the UNet has no conv weights; nothing to do")
            return
        if have == want:
            session.restorer.notes.append(f"UNet already {label}")
            return

        def convert_back() -> None:
            if not _on_meta(unet):
                unet.to(memory_format=have)

        session.restorer.callback(convert_back, note=f"UNet {label}")
        unet.to(memory_format=want)

    # compile -----------------------------------------------------------------------------------------------

    def apply_compile(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        """The UNet's ResBlock/SpatialTransformer blocks, compiled per generation (docs/hosts.md §6.1). The key
        names what torch's guards do not see (lib_optim.compile.regional): the attention A1111 bound as the
        ``CrossAttention.forward`` class attribute of ldm and sgm (applied just before, §3.2), and with the
        "functional" LoRA setting the loaded LoRAs, which that mode reads on every forward (§6.2)."""
        unet = _diffusion_model(getattr(p, "sd_model", None))
        if unet is None:
            log.warning("compile: no UNet loaded; nothing compiled")
            return
        forwards = []
        for name in ("ldm.modules.attention", "sgm.modules.attention"):
            cross = getattr(self._modules.loaded(name), "CrossAttention", None)
            forwards.append(vars(cross).get("forward") if cross is not None else None)
        key: tuple[Any, ...] = tuple(forwards)
        opts = getattr(self._modules.loaded("modules.shared"), "opts", None)
        if getattr(opts, "lora_functional", False):
            networks = self._modules.loaded("networks")
            loaded = getattr(networks, "loaded_networks", None) or []
            key += tuple(
                (getattr(n, "name", ""), getattr(n, "te_multiplier", None), getattr(n, "unet_multiplier", None))
                for n in loaded
            )
        device = getattr(self._modules.loaded("modules.devices"), "device", "cpu")
        self.compile_blocks(session, unet, key=key, device=device, p=p, region=self._compile_region(unet))
        vae = getattr(getattr(p, "sd_model", None), "first_stage_model", None)
        vae_key = tuple(  # the VAE's attention, bound as a class attribute like the UNet's (§3.2)
            vars(block).get("forward") if block is not None else None
            for block in (
                getattr(self._modules.loaded(name), "AttnBlock", None)
                for name in ("ldm.modules.diffusionmodules.model", "sgm.modules.diffusionmodules.model")
            )
        )
        if vae is not None:
            self.compile_vae(session, vae, key=vae_key, region=self._compile_region(vae), p=p)

    def _compile_region(self, unet: Any) -> CompileRegion:
        """What keeps A1111's block code traceable (docs/hosts.md §6.10): our einops, its ``CondFunc`` s resolved,
        the layers' own forwards once the LoRA weights are applied, the sdp-no-mem kernel choice entered around the
        region, ``get_available_vram`` measured and ``shared`` (its settings) snapshot before the region; the LoRA
        state as the weights token."""
        free_patches, measure = compile_regions.free_memory_patch(self._modules, "a1111")
        shared_patches, refresh = compile_regions.shared_patches(self._modules, "a1111")
        patches: list[compile_regions.RegionChange] = [
            *compile_regions.einops_patches(self._modules, "a1111"),
            *compile_regions.condfunc_patches(unet),
            *compile_regions.rewrite_patches(self._modules, "a1111", unet),
            *compile_regions.isfunction_patches(self._modules, "a1111"),
            *compile_regions.partial_patches(self._modules, "a1111"),
            *compile_regions.lora_patches(self._modules),
            *compile_regions.sdp_no_mem_patches(self._modules, unet),  # after the rewrites: its forward wins
            *free_patches,
            *shared_patches,
        ]
        return CompileRegion(
            patches=patches,
            weights_token=compile_regions.lora_token(self._modules, unet),
            weights_dirty=compile_regions.lora_dirty(self._modules),
            interrupt=compile_regions.interrupt_check(self._modules),
            prepare=compile_regions.prepare_all(measure, refresh),
        )

    # compile warm-up ---------------------------------------------------------------------------------------

    def model_family(self, sd_model: Any) -> str | None:
        return base.unet_family(sd_model) if _diffusion_model(sd_model) is not None else None

    def warmup_forward(self, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None]:
        """One UNet call as a k-diffusion sampling step makes it (docs/hosts.md §6.11): empty prompts' conditioning
        from the model's own text encoder under autocast, cond and uncond in one batch when ``batch_cond_uncond``
        (else each alone: the same shapes), float32 latents with txt2img's image conditioning, a float timestep,
        and ``sd_model.apply_model`` under ``no_grad`` and the sampling's autocast."""
        import torch

        devices = self._modules.get("modules.devices")
        processing = self._modules.get("modules.processing")
        shared = self._modules.get("modules.shared")
        if devices is None or processing is None or not hasattr(sd_model, "apply_model"):
            raise NotSupportedHere("[Optim] compile warm-up: modules.devices/processing or the model is missing")
        together = bool(getattr(getattr(shared, "opts", None), "batch_cond_uncond", True))
        rows = batch * 2 if together else batch
        conditioning = getattr(self._modules.get("modules.prompt_parser"), "SdConditioning", None)

        def run() -> None:
            device = devices.device
            prompts = [""] * rows
            texts = conditioning(prompts, width=width, height=height) if conditioning is not None else prompts
            channels = int(getattr(sd_model, "latent_channels", 4) or 4)
            with torch.no_grad():
                with devices.autocast():
                    cond = sd_model.get_learned_conditioning(texts)
                x = torch.zeros((rows, channels, height // 8, width // 8), device=device, dtype=torch.float32)
                image_cond = processing.txt2img_image_conditioning(sd_model, x, width, height)
                if isinstance(cond, dict):
                    c = {**cond, "c_concat": [image_cond]}
                else:
                    c = {"c_crossattn": [cond], "c_concat": [image_cond]}
                t = torch.full((rows,), 500.0, device=device, dtype=torch.float32)
                upcast = getattr(devices, "unet_needs_upcast", False)
                with devices.without_autocast() if upcast else devices.autocast():
                    sd_model.apply_model(x, t, cond=c)

        return run

    def warmup_decode(self, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None]:
        import torch

        channels = int(getattr(sd_model, "latent_channels", 4) or 4)
        return self.decode_latents(sd_model, width, height, batch, channels=channels, grad_mode=torch.no_grad)

    # VAE on CPU --------------------------------------------------------------------------------------------

    def apply_vae_on_cpu(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        if settings.vae_on_cpu is not Tri.ON:
            return  # off: A1111 never keeps the VAE on the CPU by itself (only --medvram/--lowvram do)
        import torch

        sd_model = getattr(p, "sd_model", None)
        vae = getattr(sd_model, "first_stage_model", None)
        if vae is None:
            log.warning("vae_on_cpu: no VAE loaded; nothing changed")
            return
        if getattr(sd_model, "lowvram", False):
            log.warning("vae_on_cpu: ignored with --medvram/--lowvram (the WebUI moves the VAE to the GPU on use)")
            return
        devices = self._modules.get("modules.devices")
        state = _CpuVae(sd_model, devices)
        restorer = session.restorer
        bound = {name: getattr(sd_model, name) for name in ("decode_first_stage", "encode_first_stage")}
        restorer.callback(state.restore, note="VAE on CPU in float32")
        state.set_dtype_vae()  # restored by state.restore
        for name, method in bound.items():
            restorer.enter(patched_attr(sd_model, name, state.make_wrapper(method)))
        vae.to(device=torch.device("cpu"), dtype=torch.float32)
        torch_gc = getattr(devices, "torch_gc", None)
        if callable(torch_gc):
            torch_gc()

    # VAE tiling --------------------------------------------------------------------------------------------

    def apply_vae_tiling(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        """Our tiled decoder/encoder on ``sd_model.first_stage_model`` (docs/hosts.md §5.1, §5.6): every decode —
        txt2img, hires, "Full" live previews — and every encode (img2img, inpainting, hires) goes through the VAE's
        ``decoder``/``encoder`` modules. ``off``: A1111 never tiles by itself, nothing to switch off."""
        if settings.vae_tiling is VaeTiling.OFF:
            session.restorer.notes.append("VAE tiling off (A1111 never tiles by itself)")
            return
        tile_vae(session, getattr(getattr(p, "sd_model", None), "first_stage_model", None))
