"""sd-webui-optim: the per-generation "Optim" accordion (txt2img and img2img).

Thin on purpose: everything it does lives in lib_optim.hosts.webui (host glue) and lib_optim (core).
Every hook is a no-op unless the accordion is on and a control differs from "as the host has it".
"""

from modules import script_callbacks, scripts

from lib_optim.hosts import webui
from lib_optim.hosts.common import SCRIPT_TITLE


class OptimScript(scripts.Script):
    sorting_priority = 15  # Forge orders AlwaysVisible accordions by it (A1111 ignores it)

    def title(self):
        return SCRIPT_TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return webui.build_ui(self, is_img2img)

    def process(self, p, *args):
        webui.process(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        webui.before_sampling(p)

    def postprocess_batch(self, p, *args, **kwargs):
        webui.after_batch(p)

    def postprocess(self, p, processed, *args):
        webui.postprocess(p)


webui.ensure_runtime()
webui.install_fallback()
webui.install_compile_announcer()
script_callbacks.on_cfg_after_cfg(lambda _params: webui.on_step())
script_callbacks.on_model_loaded(webui.on_model_loaded)
script_callbacks.on_ui_settings(webui.register_settings)
script_callbacks.on_before_ui(webui.register_xyz_axes)
script_callbacks.on_app_started(lambda _demo, app: webui.register_api(app))
script_callbacks.on_script_unloaded(webui.on_script_unloaded)
script_callbacks.on_ui_tabs(webui.ui_tabs)
