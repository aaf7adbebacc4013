"""The pipelines layer: load diffusers Stable Diffusion pipelines, generate with tags, train on them.

    loading      `load_pipeline`: a family's named model (`toy`), a diffusers folder or a single file
    single_file  offline single-file SD1/SD2 checkpoints, configs from the family registry
    generate     images from prompts with `<perfusion:...>` tags
    backend      DiffusersBackend: the trainer's Backend over a diffusers pipeline
"""
