"""The toy world: a procedural text-to-image world whose every image property can be read back exactly.

It lets us train a real (tiny) Stable-Diffusion-architecture model on a CPU and measure concept
fidelity and prompt alignment with analytic checkers instead of CLIP scores. See DESIGN.md §4.
"""
