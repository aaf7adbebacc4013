"""Serving a concept library on NVIDIA Triton Inference Server: one engine, many concepts, each request its own.

library (the math: library weights and per-request coefficient channels), runtime (one request: tags to
image, with the networks as callables), repository (the exporter of a Triton model repository),
triton_config (config.pbtxt and model.py stubs), triton_models (the Python-backend models), refit (a
concept into a slot of a live repository), server (`perfusion serve`: find and start tritonserver).
"""
