// sd-webui-optim: tooltips and small behaviours of the Optim accordion.
// Uses only our own elem_ids (script_txt2img_optim_*, script_img2img_optim_*) and the host's
// onUiLoaded/gradioApp helpers (script.js), which A1111 v1.10.1 and Forge f2 both provide.
(function () {
    "use strict";

    const TIPS = {
        attention: "Attention implementation for this generation. host = as the WebUI has it; auto = fastest that fits.",
        channels_last: "Channels-last memory format for the UNet during this generation (tensor-core GPUs).",
        vae_on_cpu: "Decode (and in img2img encode) on the CPU in float32, freeing the VAE's GPU memory.",
        inference_memory_mb: "Forge: GPU memory kept free for computation while the model loads. 0 = as Forge has it.",
        profile: "Fill the controls with a launch profile's per-generation defaults.",
        refresh: "Refresh the status line (effective attention, checker findings).",
    };

    function decorate(tab) {
        const app = gradioApp();
        for (const [key, tip] of Object.entries(TIPS)) {
            const el = app.getElementById(`script_${tab}_optim_${key}`);
            if (el && !el.title) {
                el.title = tip;
            }
        }
    }

    onUiLoaded(function () {
        decorate("txt2img");
        decorate("img2img");
    });
})();
