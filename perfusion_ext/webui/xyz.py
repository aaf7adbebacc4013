"""X/Y/Z plot axes "Perfusion β", "Perfusion τ" and "Perfusion strength". No WebUI imports (the plot's
module is passed in), unit-tested in CI.

An axis value is written into every `<perfusion:...>` tag of the cell's prompts (prompt, negative, hires),
so each cell's infotext holds the tag that made it and "Send to txt2img" reproduces the cell. A β or τ
replaces the tag's schedule (and its hires one) for that cell.
"""
from __future__ import annotations

from ..core.tags import TAG_RE, rewrite_tags

PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
XYZ_MODULES = ("xyz_grid.py", "scripts.xyz_grid")


def rewrite_processing(p, **changes) -> int:
    """Set options on every Perfusion tag of `p`'s prompts (strings or lists); the number of tags changed."""
    total = 0
    for field in PROMPT_FIELDS:
        value = getattr(p, field, None)
        if isinstance(value, str):
            new, n = rewrite_tags(value, **changes)
            setattr(p, field, new)
            total += n
        elif isinstance(value, list):
            rewritten = [rewrite_tags(v, **changes) if isinstance(v, str) else (v, 0) for v in value]
            setattr(p, field, [v for v, _ in rewritten])
            total += sum(n for _, n in rewritten)
    return total


def _apply(option: str):
    def apply(p, x, xs):
        rewrite_processing(p, **{option: float(x)})

    return apply


def confirm(p, xs) -> None:
    """Refuse a plot whose prompts have no Perfusion tag: every cell would be the same image."""
    texts = []
    for field in PROMPT_FIELDS:
        value = getattr(p, field, None)
        texts += [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]
    if not any(TAG_RE.search(t) for t in texts):
        raise RuntimeError("Perfusion axis: the prompt has no <perfusion:NAME> tag to set it on")


def _confirm_tau(p, xs) -> None:
    confirm(p, xs)
    if any(float(x) <= 0 for x in xs):
        raise RuntimeError("Perfusion τ axis: every value must be > 0")


AXES = (("Perfusion β", "beta", confirm), ("Perfusion τ", "tau", _confirm_tau),
        ("Perfusion strength", "strength", confirm))


def find_module(scripts_data):
    """The X/Y/Z plot's loaded module among the WebUI's `scripts.scripts_data`, or None."""
    for data in scripts_data or []:
        if getattr(getattr(data, "script_class", None), "__module__", None) in XYZ_MODULES and hasattr(data, "module"):
            return data.module
    return None


def register(module) -> list[str]:
    """Add our axes to the plot's `axis_options` (once, however often the UI is rebuilt); the labels added."""
    existing = {getattr(option, "label", None) for option in module.axis_options}
    added = []
    for label, option, check in AXES:
        if label not in existing:
            module.axis_options.append(module.AxisOption(label, float, _apply(option), confirm=check))
            added.append(label)
    return added
