"""AUTOMATIC1111 entry point of sd-webui-perfusion: registers callbacks; the code is in perfusion_ext/webui."""
import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_root, os.path.join(_root, "export")):  # perfusion_ext, and the exporter as `perfusion_export`
    if _path not in sys.path:
        sys.path.append(_path)  # the WebUI only adds the root while loading scripts; later imports need both

from modules import script_callbacks  # noqa: E402

from perfusion_ext.webui import api, settings, state, ui_tab, wiring  # noqa: E402
from perfusion_ext.webui.wiring import PerfusionScript  # noqa: E402,F401  (the WebUI collects Script classes)

script_callbacks.on_before_ui(wiring.before_ui)
script_callbacks.on_ui_tabs(ui_tab.create_tab)
script_callbacks.on_ui_settings(settings.add_settings)
script_callbacks.on_app_started(api.register)
script_callbacks.on_infotext_pasted(wiring.infotext_pasted)
script_callbacks.on_cfg_denoiser(wiring.cfg_denoiser)
script_callbacks.on_model_loaded(state.release_hooks)
script_callbacks.on_script_unloaded(state.release_hooks)
