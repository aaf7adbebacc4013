"""AUTOMATIC1111 WebUI glue: the only code that imports WebUI modules (`modules.*`).

One file per job, like the WebUI's built-in Lora extension:
    state.py          concepts folder, singletons          extra_network.py  the <perfusion:...> extra network
    runtime.py        what a tag does (no WebUI imports)    prompts.py        prompt rewriting, infotext (pure)
    concepts.py       the concepts folder index (pure)      cards.py          the Extra Networks "Perfusion" page
    backend.py        trainer Backend over the ldm model    training.py       job runner, previews, queue lock
    jobs.py           server-side training jobs (pure)      train_request.py  REST/tab request validation (pure)
    api.py            /perfusion/v1 routes                  ui_tab.py         the "Perfusion" tab
    settings.py       the settings section                  wiring.py         callbacks + the AlwaysVisible script
    export.py         calls the ONNX exporter
The modules marked pure import nothing from the WebUI and are unit-tested in CI.
"""
