"""The Export section and POST /perfusion/v1/export: a thin call into the exporter (perfusion_export).

The exporter is developed separately (export/perfusion_export); until it provides
`export_concepts(model, concepts, out_dir, **options)`, both answer with a clear "not available".
"""
from __future__ import annotations

from .train_request import ApiError


def exporter():
    try:
        import perfusion_export
    except ImportError:
        return None
    return getattr(perfusion_export, "export_concepts", None)


def export_from_body(body) -> dict:
    fn = exporter()
    if fn is None:
        raise ApiError(501, "the ONNX exporter (perfusion_export.export_concepts) is not available in this version")
    if not isinstance(body, dict) or not isinstance(body.get("concepts"), list):
        raise ApiError(422, "body must be {\"concepts\": [names], \"out_dir\": path, ...}")
    from . import state

    paths = [str(state.store().path_for(n)) for n in body["concepts"]]
    result = fn(model=body.get("model"), concepts=paths, out_dir=body.get("out_dir"),
                **{k: v for k, v in body.items() if k not in ("model", "concepts", "out_dir")})
    return {"result": str(result)}
