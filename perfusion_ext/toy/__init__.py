"""The toy world, a plug-in: a procedural text-to-image world whose every image property can be read back exactly.

It lets us train a real (tiny) Stable-Diffusion-architecture model on a CPU and measure concept
fidelity and prompt alignment with analytic checkers instead of CLIP scores (docs/design.md, "The toy
world"). Importing the package registers the toy model with the family registry (`plugin.py`).
"""
from .plugin import register as _register

_register()
