"""The prompt tag grammar, shared by the WebUI, the CLI and the API:
`<perfusion:NAME[:STRENGTH][:beta=B][:tau=T][:hr_beta=B][:hr_tau=T]>`.

A tag stands for the concept word at its position ("a photo of <perfusion:teddy> on the beach") and
activates the concept's K/V edits. Malformed tags are reported as warnings, never fatal: the
generation goes on without that concept.

β and τ take a number or a per-step schedule, `beta=0.75@0,0.65@0.5`: each value holds from a fraction
of the sampling steps on (fractions in [0, 1), ascending; before the first one the concept's default
holds; a first value without `@` starts at 0). `hr_beta=`/`hr_tau=` (same grammar) apply to the WebUI's
hires pass instead; without them the hires pass uses `beta=`/`tau=`.
"""
from __future__ import annotations

import dataclasses
import re

TAG_RE = re.compile(r"<perfusion:([^>]*)>", re.IGNORECASE)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}$")


# A per-step schedule: ((fraction, value), ...), fractions ascending in [0, 1). Empty: no value given.
Schedule = tuple[tuple[float, float], ...]
GATE_OPTIONS = ("beta", "tau", "hr_beta", "hr_tau")
MAX_STRENGTH = 100.0  # far past any useful strength; around 1e30 the edit overflows and the image turns black


@dataclasses.dataclass(frozen=True)
class ConceptTag:
    """One tag. `beta`/`tau` are the values at the start of sampling (None: the concept's default there);
    a schedule is kept whole in `beta_schedule`/`tau_schedule` (empty for a plain number)."""

    name: str
    strength: float = 1.0
    beta: float | None = None
    tau: float | None = None
    start: int = 0  # span of the tag in the prompt
    end: int = 0
    beta_schedule: Schedule = ()
    tau_schedule: Schedule = ()
    hr_beta: Schedule = ()  # the hires pass (empty: as the first pass)
    hr_tau: Schedule = ()

    def schedule(self, key: str, hires: bool = False) -> Schedule:
        """The β ("beta") or τ ("tau") schedule in effect for a pass; a plain number is one point at 0."""
        if hires and getattr(self, f"hr_{key}"):
            return getattr(self, f"hr_{key}")
        whole = getattr(self, f"{key}_schedule")
        if whole:
            return whole
        value = getattr(self, key)
        return () if value is None else ((0.0, float(value)),)

    def options(self) -> tuple:
        """Everything but the name and the span: equal options act the same."""
        return (self.strength, self.beta, self.tau, self.beta_schedule, self.tau_schedule, self.hr_beta, self.hr_tau)


def parse_schedule(text: str, key: str = "beta") -> float | Schedule:
    """`0.7` → 0.7; `0.75@0,0.65@0.5` → ((0.0, 0.75), (0.5, 0.65)). ValueError with the reason otherwise."""
    items = [item.strip() for item in text.split(",")]
    if len(items) == 1 and "@" not in items[0]:
        value = _finite(items[0], key)
        _check_value(value, key)
        return value
    points: list[tuple[float, float]] = []
    for k, item in enumerate(items):
        value_text, at, fraction_text = item.partition("@")
        if not at:
            if k:
                raise ValueError(f"{key}: every value after the first needs @FRACTION, got {item!r}")
            fraction_text = "0"
        value, fraction = _finite(value_text, key), _finite(fraction_text, key)
        _check_value(value, key)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{key}: fraction {fraction:g} is outside [0, 1) (a fraction of the sampling steps)")
        if points and fraction <= points[-1][0]:
            raise ValueError(f"{key}: fractions must ascend, got {points[-1][0]:g} then {fraction:g}")
        points.append((fraction, value))
    return tuple(points)


def _finite(text: str, key: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key}: {text.strip()!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{key}: {text.strip()!r} is not a finite number")
    return value


def _strength(text: str) -> float:
    return check_strength(_finite(text, "strength"))


def check_strength(value: float) -> float:
    """`value` when it is a finite strength within ±MAX_STRENGTH, else ValueError with the reason. Tags and
    `activate(strength=…)` share it: past the bound the edit overflows into a black image."""
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"strength: {value:g} is not a finite number")
    if abs(value) > MAX_STRENGTH:
        raise ValueError(f"strength: {value:g} is outside [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]")
    return value


def _check_value(value: float, key: str) -> None:
    if key.endswith("tau") and value <= 0:
        raise ValueError("tau must be > 0")


def value_at(schedule: Schedule, fraction: float, default: float) -> float:
    """The value in effect at `fraction` of the sampling steps: the last point at or before it, else `default`."""
    out = default
    for at, value in schedule:
        if at <= fraction + 1e-12:
            out = value
        else:
            break
    return out


def _number(value: float) -> str:
    """Short (`0.7`, not `0.69999999999999996`) but exact: the text parses back to the same float, so a rewritten
    tag never changes its meaning (`0.9999999` must not become `1`, which is no fraction)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def format_schedule(value: float | Schedule) -> str:
    if isinstance(value, tuple):
        if len(value) == 1 and value[0][0] == 0.0:
            return _number(value[0][1])
        return ",".join(f"{_number(v)}@{_number(f)}" for f, v in value)
    return _number(value)


@dataclasses.dataclass
class ParsedPrompt:
    segments: list  # str pieces and ConceptTag objects, in prompt order
    tags: list[ConceptTag]
    warnings: list[str]

    def text_with(self, replace) -> str:
        """The prompt with every tag replaced by replace(tag) (malformed tags are dropped)."""
        return "".join(s if isinstance(s, str) else replace(s) for s in self.segments)


def parse_tag_body(body: str) -> ConceptTag:
    """Parse `NAME[:STRENGTH][:beta=B][:tau=T][:hr_beta=B][:hr_tau=T]` (B, T: a number or a schedule);
    raises ValueError with a message for the user."""
    parts = [p.strip() for p in body.split(":")]
    name = parts[0]
    if not NAME_RE.match(name):
        raise ValueError(f"invalid concept name {name!r} (letters, digits, space, _ . - only)")
    strength, options = 1.0, {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        try:
            if not eq:
                strength = _strength(part)
                continue
            if key in ("strength", "w"):
                strength = _strength(value)
                continue
            if key not in GATE_OPTIONS:
                raise ValueError(f"unknown option {key!r} (use beta=, tau=, hr_beta=, hr_tau=)")
            options[key] = parse_schedule(value, key)
        except ValueError as exc:
            if str(exc) == "tau must be > 0":
                raise ValueError(f"tau must be > 0 in <perfusion:{body}>") from None
            raise ValueError(f"bad option {part!r} in <perfusion:{body}>: {exc}") from None
    gates = {}
    for key in ("beta", "tau"):
        value = options.get(key)
        if isinstance(value, tuple):  # a schedule: its value at 0 (None before a later first point)
            start = value[0][1] if value[0][0] == 0.0 else None
            gates[key], gates[f"{key}_schedule"] = start, (value if len(value) > 1 or start is None else ())
        else:
            gates[key] = value
    for key in ("hr_beta", "hr_tau"):
        value = options.get(key)
        gates[key] = () if value is None else (value if isinstance(value, tuple) else ((0.0, value),))
    return ConceptTag(name, strength, **gates)


def parse_prompt(prompt: str) -> ParsedPrompt:
    segments, tags, warnings = [], [], []
    pos = 0
    for match in TAG_RE.finditer(prompt):
        segments.append(prompt[pos:match.start()])
        try:
            tag = dataclasses.replace(parse_tag_body(match.group(1)), start=match.start(), end=match.end())
        except ValueError as exc:
            warnings.append(f"ignored {match.group(0)}: {exc}")
        else:
            segments.append(tag)
            tags.append(tag)
        pos = match.end()
    segments.append(prompt[pos:])
    return ParsedPrompt([s for s in segments if s != ""], tags, warnings + unclosed_warnings(prompt))


_OPEN_RE = re.compile(r"<perfusion:", re.IGNORECASE)


def unclosed_warnings(prompt: str) -> list[str]:
    """A warning for a `<perfusion:` that no `>` closes (it stays plain text in the prompt)."""
    rest = TAG_RE.sub("", prompt or "")
    return [f"unclosed tag {rest[m.start():m.start() + 40]!r}: no '>' ends it, so it is plain text in the prompt"
            for m in _OPEN_RE.finditer(rest)]


def format_tag(name: str, strength: float = 1.0, beta: float | Schedule | None = None,
               tau: float | Schedule | None = None, hr_beta: float | Schedule | None = None,
               hr_tau: float | Schedule | None = None) -> str:
    """The tag text; β/τ (and the hires ones) as numbers or schedules. Parses back to the same options."""
    gates = {"beta": beta, "tau": tau, "hr_beta": hr_beta, "hr_tau": hr_tau}
    given = {k: v for k, v in gates.items() if v is not None and v != ()}
    parts = [name] + ([_number(strength)] if strength != 1.0 or given else [])
    parts += [f"{k}={format_schedule(v)}" for k, v in given.items()]
    return "<perfusion:" + ":".join(parts) + ">"


def tag_text(tag: ConceptTag) -> str:
    """`format_tag` of a parsed tag (schedules kept)."""
    return format_tag(tag.name, tag.strength, tag.beta_schedule or tag.beta, tag.tau_schedule or tag.tau,
                      tag.hr_beta or None, tag.hr_tau or None)


def rewrite_tags(prompt: str, strength: float | None = None, beta: float | None = None,
                 tau: float | None = None) -> tuple[str, int]:
    """The prompt with the given options set on every Perfusion tag (a β or τ replaces its schedule and the
    hires one); malformed tags are left alone. Returns (prompt, number of tags changed)."""
    count = 0

    def sub(match):
        nonlocal count
        try:
            tag = parse_tag_body(match.group(1))
        except ValueError:
            return match.group(0)
        changes = {}
        if strength is not None:
            changes["strength"] = float(strength)
        if beta is not None:
            changes.update(beta=float(beta), beta_schedule=(), hr_beta=())
        if tau is not None:
            if tau <= 0:
                raise ValueError("tau must be > 0")
            changes.update(tau=float(tau), tau_schedule=(), hr_tau=())
        count += 1
        return tag_text(dataclasses.replace(tag, **changes))

    return TAG_RE.sub(sub, prompt or ""), count
