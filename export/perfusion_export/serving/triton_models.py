"""The Python-backend models of a library repository; they run only inside Triton's Python stub.

`OnnxModel` serves one network through ONNX Runtime (the `python` flavour): Triton's dynamic batcher
hands it the requests it gathered, and rows of the same shape run as one batch. `PipelineModel` serves a
whole request: `LibraryPipeline` with BLS calls into the batched networks, so the UNet calls of requests
running in different pipeline instances meet in the UNet's batcher. A request that fails (an unknown
concept, bad settings) gets its own error; the others in its batch are answered.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python stub

from perfusion_ext.core.errors import PerfusionError

from .runtime import LibraryPipeline

THREADS_VARIABLE = "PERFUSION_TRITON_THREADS"  # ONNX Runtime intra-op threads per network (0: ORT's choice)


def error_response(exc: Exception) -> pb_utils.InferenceResponse:
    """Our own errors are the client's (HTTP 400, the message says what to change); anything else is a 500."""
    if isinstance(exc, PerfusionError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))


class OnnxModel:
    def initialize(self, args):
        import onnxruntime as ort

        folder = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get(THREADS_VARIABLE, "0"))
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.outputs = [o["name"] for o in config["output"]]

    def read(self, request) -> dict[str, np.ndarray]:
        out = {}
        for name, rank in self.ranks.items():
            array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            out[name] = array.reshape(array.shape[0]) if rank == 1 else array  # timestep: [B, 1] -> [B]
        return out

    def execute(self, requests):
        responses: list = [None] * len(requests)
        groups: dict[tuple, list] = {}
        for index, request in enumerate(requests):
            try:
                feed = self.read(request)
            except Exception as exc:  # noqa: BLE001 — a malformed request fails alone
                responses[index] = error_response(exc)
                continue
            groups.setdefault(tuple(a.shape[1:] for a in feed.values()), []).append((index, feed))
        for members in groups.values():
            try:
                batch = {n: np.concatenate([feed[n] for _, feed in members]) for n in self.ranks}
                results = self.session.run(self.outputs, batch)
            except Exception as exc:  # noqa: BLE001
                for index, _ in members:
                    responses[index] = error_response(exc)
                continue
            start = 0
            for index, feed in members:
                rows = next(iter(feed.values())).shape[0]
                responses[index] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(n, np.ascontiguousarray(r[start:start + rows])) for n, r in zip(self.outputs, results)])
                start += rows
        return responses


def bls(model: str, inputs: tuple[str, ...], output: str):
    """A runner for LibraryPipeline that calls `model` in this server (Business Logic Scripting)."""
    def run(*arrays):
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=[output],
            inputs=[pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in zip(inputs, arrays)])
        response = request.exec()
        if response.has_error():
            raise PerfusionError(f"{model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()

    return run


class PipelineModel:
    def initialize(self, args):
        unet = bls("unet", ("sample", "timestep", "encoder_hidden_states"), "out_sample")
        self.pipeline = LibraryPipeline(
            Path(args["model_repository"]) / "library",
            text_encoder=bls("text_encoder", ("input_ids",), "last_hidden_state"),
            unet=lambda sample, t, context: unet(sample, t.reshape(-1, 1), context),
            vae_decoder=bls("vae_decoder", ("latent_sample",), "sample"))

    @staticmethod
    def option(request, name: str):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        value = tensor.as_numpy().reshape(-1)[0]
        return value.decode("utf-8") if isinstance(value, bytes) else value.item()

    def answer(self, request) -> pb_utils.InferenceResponse:
        try:
            prompt = self.option(request, "prompt")
            settings = {k: self.option(request, k) for k in ("seed", "steps", "guidance", "width", "height")}
            image = self.pipeline.generate(prompt, self.option(request, "negative_prompt") or "",
                                           **{k: v for k, v in settings.items() if v is not None})
        except Exception as exc:  # noqa: BLE001 — every failure is this request's answer, never the server's
            return error_response(exc)
        return pb_utils.InferenceResponse([pb_utils.Tensor("image", image)])

    def execute(self, requests):
        return [self.answer(r) for r in requests]
