"""Export a torch module to ONNX with torch's dynamo exporter, and read/write initializers by name.

Every file is written the same way so two exports of the same inputs are byte-identical: the graph
is exported, its dynamic axes get the contract's names, node metadata (stack traces with absolute
paths, fx node names) is dropped, and all weights go to one `<stem>.onnx_data` beside the `.onnx`.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import onnx_ir as ir
import torch

from .layouts import Contract

EXTERNAL_THRESHOLD = 256  # bytes; smaller tensors stay inline in the .onnx


def _dim_key(name: str) -> str:
    return "d_" + re.sub(r"\W", "_", name)


def _dynamic_shapes(contract: Contract):
    dims: dict[str, torch.export.Dim] = {}
    spec = []
    for port in contract.inputs:
        axes = {}
        for axis, d in enumerate(port.dims):
            if isinstance(d, str):
                axes[axis] = dims.setdefault(d, torch.export.Dim(_dim_key(d)))
        spec.append(axes or None)
    return tuple(spec)


def _rename_dims(model: ir.Model, contract: Contract) -> None:
    """Give graph I/O the contract's axis names, and the same names wherever those symbols appear inside."""
    mapping: dict[str, str] = {}
    ports = list(zip(model.graph.inputs, contract.inputs)) + list(zip(model.graph.outputs, contract.outputs))
    for value, port in ports:
        for axis, d in enumerate(port.dims):
            if isinstance(d, str) and value.shape is not None:
                old = value.shape[axis]
                if isinstance(old, ir.SymbolicDim) and old.value is not None:
                    mapping.setdefault(old.value, d)
    for value, port in ports:  # outputs may be expressions of the input symbols: name them outright
        if value.shape is not None:
            value.shape = ir.Shape([d if isinstance(d, str) else value.shape[i] for i, d in enumerate(port.dims)])
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.shape is None or value in model.graph.outputs:
                continue
            value.shape = ir.Shape([mapping.get(d.value, d.value) if isinstance(d, ir.SymbolicDim) else d
                                    for d in value.shape])


def _strip_metadata(model: ir.Model) -> None:
    model.metadata_props.clear()
    model.doc_string = None
    model.graph.doc_string = None
    model.graph.metadata_props.clear()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()
    for value in list(model.graph.inputs) + list(model.graph.initializers.values()):
        value.metadata_props.clear()


def export_module(module: torch.nn.Module, args: tuple, contract: Contract, opset: int, path: Path) -> Path:
    """Export `module` called with `args` to `path` (+ `<stem>.onnx_data`); returns `path`."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The axis name")  # a Dim shared by inputs is named once
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, optimize=True, verbose=False,
            input_names=[p.name for p in contract.inputs], output_names=[p.name for p in contract.outputs],
            dynamic_shapes=_dynamic_shapes(contract),
        )
    model = program.model
    _rename_dims(model, contract)
    _strip_metadata(model)
    model.producer_name, model.producer_version = "perfusion-export", None
    save(model, path)
    return path


def data_name(path: Path) -> str:
    return "model.onnx_data" if path.name == "model.onnx" else f"{path.stem}.onnx_data"


def save(model: ir.Model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path, external_data=data_name(path), size_threshold_bytes=EXTERNAL_THRESHOLD)


def load(path: Path) -> ir.Model:
    return ir.load(path)


def replace_initializers(path: Path, tensors: dict[str, torch.Tensor], out: Path) -> None:
    """Write the model at `path` to `out` with the named initializers' values replaced (same shapes/dtypes).

    This is a refit: the graph is untouched, so a TensorRT engine built from either file refits by name.
    """
    model = load(path)
    inits = model.graph.initializers
    for name, tensor in tensors.items():
        if name not in inits:
            raise KeyError(name)
        old = inits[name]
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(old.shape)}")
        new = ir.Tensor(tensor.detach().cpu().contiguous().numpy().astype(old.const_value.dtype.numpy()), name=name)
        old.const_value = new
    save(model, out)
