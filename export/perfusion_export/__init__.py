"""The top layer for deployment: the ONNX exporter, baking Perfusion concepts into ONNX UNets and text encoders.

Entry points (imported from their modules so that `perfusion --help` stays light):
    perfusion_export.exporter.export_pipeline(model, concepts, out, layout=…, precision=…, slots=…)
    perfusion_export.refit.refit(folder, concept_file, slot)
    perfusion_export.ort_pipeline.generate_onnx(folder, prompt, seed=…, steps=…, n=…, guidance_scale=…)
One job per module: bake (the math), modules (torch wrappers with stable initializer names),
components (per-part export), onnx_io (dynamo export, deterministic save, initializer rewrite),
layouts (folders and I/O contracts), tokens (concept ids, tokenizer), verify, slots, manifest, staging.
"""
