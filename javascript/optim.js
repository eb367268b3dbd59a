// sd-webui-optim: tooltips and small behaviours of the Optim accordion.
// Uses only our own elem_ids (script_txt2img_optim_*, script_img2img_optim_*), the hosts' generation-info
// element (html_info_txt2img / html_info_img2img) and the host's onUiLoaded/gradioApp helpers (script.js),
// which A1111 v1.10.1 and Forge f2 both provide.
(function () {
    "use strict";

    // The fields' tooltips come from lib_optim/settings.py FIELDS (FieldSpec.tooltip): lib_optim/ui.py puts them
    // into the status line as <span class="optim-tips" data-tips="{...}">. Only the non-field controls are here.
    const OWN_TIPS = {
        profile: "Fill the controls with a launch profile's per-generation defaults.",
        refresh: "Refresh the status line (effective attention, checker findings, compile warm-up).",
    };

    function element(tab, key) {
        return gradioApp().getElementById(`script_${tab}_optim_${key}`);
    }

    // What is not available here (and why) lives folded in the status line; the dropdown's tooltip says it
    // too, so it does not need a line of its own above the dropdown.
    function unavailableText(tab) {
        const status = element(tab, "status");
        const details = status && status.querySelector(".optim-unavailable");
        if (!details) {
            return "";
        }
        const summary = details.querySelector("summary");
        return details.textContent.replace(summary ? summary.textContent : "", "").trim();
    }

    function fieldTips(tab) {
        const status = element(tab, "status");
        const holder = status && status.querySelector(".optim-tips");
        if (!holder) {
            return {};
        }
        try {
            return JSON.parse(holder.dataset.tips || "{}");
        } catch (error) {
            console.warn("[Optim] tooltips unreadable:", error);
            return {};
        }
    }

    function decorate(tab) {
        for (const [key, tip] of Object.entries({...fieldTips(tab), ...OWN_TIPS})) {
            const el = element(tab, key);
            if (!el) {
                continue;
            }
            let text = tip;
            if (key === "attention") {
                const missing = unavailableText(tab);
                if (missing) {
                    text += "\n" + missing;
                }
            }
            el.title = text;
        }
    }

    // The status line shows the last Optim generation: refresh it when the host shows a new generation's
    // info (the html_info element changes when a generation finishes), as the 🔄 button would.
    function refreshAfterGenerations(tab) {
        const info = gradioApp().getElementById(`html_info_${tab}`);
        if (!info) {
            return;
        }
        let pending = null;
        new MutationObserver(function () {
            if (pending !== null) {
                clearTimeout(pending);
            }
            pending = setTimeout(function () {
                pending = null;
                const button = element(tab, "refresh");
                if (button) {
                    button.click();
                    setTimeout(function () { decorate(tab); }, 500);
                }
            }, 300);
        }).observe(info, {childList: true, subtree: true, characterData: true});
    }

    // While the compile warm-up runs (lib_optim/ui.py marks the status line data-warmup="running"), refresh the
    // line every few seconds so its "running 12/38 blocks" moves; nothing is polled otherwise.
    function refreshDuringWarmup(tab) {
        setInterval(function () {
            const status = element(tab, "status");
            const line = status && status.querySelector(".optim-status");
            if (line && line.dataset.warmup === "running") {
                const button = element(tab, "refresh");
                if (button) {
                    button.click();
                }
            }
        }, 5000);
    }

    onUiLoaded(function () {
        for (const tab of ["txt2img", "img2img"]) {
            decorate(tab);
            refreshAfterGenerations(tab);
            refreshDuringWarmup(tab);
        }
    });
})();
