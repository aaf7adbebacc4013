"""The bottom layer: the gated rank-1 edit, its hooks, layer discovery, concept files, covariance, tag grammar.

Depends on torch, safetensors and numpy only: no diffusers, no WebUI, and nothing else of this project.
    errors       PerfusionError, the one exception users see
    atomic       crash-safe file writes
    families     the model-family registry (SD1, SD2, SDXL, toy) and the plug-in hook
    gated_edit   the gated, key-locked rank-1 edit of one K/V projection, for any number of concepts
    layers       every attn2 block of a diffusers or ldm UNet under its canonical ldm name; the UNet's family
    hooks        `activate`: forward hooks that apply the edits, removed bit-for-bit
    concept      the concept file format v1: read, write, validate
    fingerprint  hashes of a text encoder and of a base model (what a concept depends on)
    covariance   C = E[e eᵀ] of a text encoder's outputs, estimated and cached
    captions     the generic caption corpus for C
    tags         the `<perfusion:NAME[:STRENGTH][:beta=B][:tau=T]>` grammar
    library      concept files by name inside a folder, never outside it
    text         prompt encoding with concept vectors at tag positions
"""
