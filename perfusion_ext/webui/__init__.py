"""The top layer inside AUTOMATIC1111: the WebUI glue, the only code that imports WebUI modules (`modules.*`).

One file per job, like the WebUI's built-in Lora extension. A `<perfusion:NAME>` tag goes
extra_network.py → activation.py → core/hooks.py → core/gated_edit.py (grammar and lookup are leaves).
    activation.py     what a tag does: prompt rewriting, infotext, hooks (pure)
    extra_network.py  the <perfusion:...> extra network and the WebUI environment it needs
    sampling.py       each sampling step: per-step β/τ schedules, the gate inspector's line (pure)
    xyz.py            X/Y/Z plot axes Perfusion β, τ and strength (pure)
    concepts.py       the concepts folder: names, cached loads, hashes, family checks (pure)
    cards.py          the Extra Networks "Perfusion" page      card_editor.py  its editor: β/τ, rename, delete…
    library_actions.py  the library for the card, the tab and the REST API: rename, trash, steps, promote (pure)
    backend.py        the trainer's Backend over the loaded ldm model
    training.py       the training job runner, previews, queue lock
    jobs.py           server-side training jobs (pure)
    train_request.py  REST/tab request validation, defaults and limits from the trainer (pure)
    export.py         calls the ONNX exporter (request validation pure)
    settings.py       the settings section
    state.py          the concepts folder and the singletons; assembles the modules above
    api.py            /perfusion/v1 routes                  ui_tab.py   the "Perfusion" tab
    wiring.py         callbacks + the AlwaysVisible script
The modules marked pure import nothing from the WebUI and are unit-tested in CI.
"""
