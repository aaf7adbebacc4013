"""The version of sd-webui-perfusion, in this one place (pyproject.toml, the API and export manifests read it)."""

__version__ = "0.2.0"
