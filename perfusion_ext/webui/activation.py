"""What a `<perfusion:...>` tag does during a WebUI generation, free of WebUI imports (unit-tested in CI).

The tag's path: the WebUI calls the extra network (extra_network.py) → `Activator.activate` here →
`core.hooks` attaches the K/V hooks → `core.gated_edit` computes each edit. Leaves: the tag grammar
(`core.tags`) and the concept lookup (`concepts.py`).

`Activator.activate(p)` is called by the extra network on every activation (each batch, and again
for the hires-fix pass). It always starts from a clean model (releases whatever an earlier
activation left, also one whose generation raised), then:
1. collects the Perfusion tags of the whole batch from the raw prompts: positive, negative, hires
   (the WebUI only parses the first prompt's tags and never the negative prompt's);
2. loads the concepts (cached; unknown names, malformed options and family mismatches become
   warnings and the generation goes on without them);
3. registers each concept's embedding under its concept word in the WebUI's textual-inversion
   database and rewrites the prompts about to be encoded, putting the word where the tag was;
4. attaches the K/V hooks of this pass's concepts to every attn2 of the UNet;
5. records `Perfusion hashes: name: <12 hex>` in the generation parameters.
`release()` undoes 3 and 4; it runs on deactivate, after processing and when `p` is closed.
β/τ of a pass come from the tag (its `hr_beta=`/`hr_tau=` on the hires pass), a schedule moving them step by
step: the sampler's step callback (sampling.py) calls `on_step`, which moves every gate to the values in
effect at that fraction of the pass's steps.

Prompt glue: the WebUI strips every `<name:...>` tag from the prompt before conditioning. A Perfusion
tag stands for the concept word at its position, so the prompts the WebUI is about to encode are rebuilt
from the raw ones with each tag replaced by a unique word under which the concept's learned embedding is
registered. The word contains a short hash of the concept's tensors: a concept retrained under the same
name gives a new word, so the WebUI's cached conditioning (keyed by the prompt text) is never reused.

The WebUI side is an `env` object (see extra_network.WebuiEnv): sd_model/unet access, embedding
registration, the WebUI's own tag stripper, warnings.
"""
from __future__ import annotations

import dataclasses
import logging
import re

from ..core.errors import PerfusionError
from ..core.hooks import Edits, ResolvedConcept, attach, detach, gate_settings, prepare_edits
from ..core.layers import unet_family
from ..core.tags import TAG_RE, ConceptTag, format_schedule, parse_tag_body, unclosed_warnings
from .clause_conditioning import ClauseConditioning, stand_in_word
from .concepts import ConceptStore, mismatch_reason

log = logging.getLogger("perfusion")
_LETTERS = "abcdefghijklmnop"  # hex digit -> letter, so the word is one run of letters for CLIP's tokenizer


# ---- prompt glue ---------------------------------------------------------------------------------
INFOTEXT_KEY = "Perfusion hashes"
CLAUSES_KEY = "Perfusion clause encoding"


def concept_word(name: str, tensor_sha256: str, clause_encoding: bool = False) -> str:
    """The prompt word that carries a concept's embedding, e.g. `perfusionteddyqkdafm`; with clause-wise encoding
    it ends in `z` (a letter the hash never gives), so the WebUI's conditioning cache, keyed by the prompt text,
    never hands one mode's conditioning to the other."""
    slug = re.sub(r"[^a-z]", "", name.lower())[:20]
    tail = "".join(_LETTERS[int(c, 16)] for c in tensor_sha256[:6].lower())
    return f"perfusion{slug}{tail}" + ("z" if clause_encoding else "")


@dataclasses.dataclass
class Occurrence:
    tag: ConceptTag
    where: str  # "prompt", "negative prompt", "hires prompt", ...


@dataclasses.dataclass
class Collected:
    """Every Perfusion tag of a batch: first occurrence per name (case-insensitive), in prompt order."""

    tags: dict[str, ConceptTag]  # name as written -> tag (first occurrence wins)
    warnings: list[str]


def scan(prompt: str) -> tuple[list[ConceptTag], list[str]]:
    """Valid tags and warnings (malformed ones) of one prompt."""
    tags, warnings = [], []
    for match in TAG_RE.finditer(prompt or ""):
        try:
            tags.append(dataclasses.replace(parse_tag_body(match.group(1)), start=match.start(), end=match.end()))
        except ValueError as exc:
            warnings.append(f"ignored {match.group(0)}: {exc}")
    return tags, warnings + unclosed_warnings(prompt)


def collect(prompt_lists: dict[str, list[str]]) -> Collected:
    """Tags across every prompt of a batch. Differing options for one name keep the first, with a warning."""
    tags: dict[str, ConceptTag] = {}
    warnings: list[str] = []
    seen_warnings = set()
    for prompts in prompt_lists.values():
        for prompt in prompts or []:
            found, warns = scan(prompt)
            for w in warns:
                if w not in seen_warnings:
                    seen_warnings.add(w)
                    warnings.append(w)
            for tag in found:
                first = tags.get(tag.name)
                if first is None:
                    tags[tag.name] = tag
                elif first.options() != tag.options():
                    w = (f"<perfusion:{tag.name}> appears with different options in one batch; the hooks are shared "
                         f"by the whole batch, so the first ({_options(first)}) is used")
                    if w not in seen_warnings:
                        seen_warnings.add(w)
                        warnings.append(w)
    return Collected(tags, warnings)


def _options(tag: ConceptTag) -> str:
    parts = [f"strength {tag.strength:g}"]
    for key in ("beta", "tau", "hr_beta", "hr_tau"):
        value = tag.schedule(key) if not key.startswith("hr_") else getattr(tag, key)
        parts += [f"{key} {format_schedule(value)}"] if value else []
    return ", ".join(parts)


def replace_tags(prompt: str, words: dict[str, str]) -> str:
    """Replace every Perfusion tag by its concept word (spaced); tags without a word are removed.

    Other extra-network tags (<lora:...>) are left for the WebUI to strip.
    """
    def sub(match):
        try:
            name = parse_tag_body(match.group(1)).name
        except ValueError:
            return ""
        word = words.get(name)
        return f" {word} " if word else ""

    return TAG_RE.sub(sub, prompt or "")


def format_hashes(hashes: dict[str, str]) -> str:
    """`teddy: 0123456789ab, dog: ...` (names lose ':' and ',' so the value parses back)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h[:12]}" for name, h in hashes.items())


def drop_concept_words_from_ti(params: dict, hashes: dict[str, str]) -> None:
    """Forge lists every embedding its text engines used as `TI: a, b` in the generation parameters; the
    concept words are Perfusion's (recorded as `Perfusion hashes`), so they are taken out of that list."""
    value = params.get("TI")
    if not isinstance(value, str) or not hashes:
        return
    words = {concept_word(name, sha) for name, sha in hashes.items()}
    kept = [t for t in (x.strip() for x in value.split(",")) if t and t not in words]
    if kept:
        params["TI"] = ", ".join(kept)
    else:
        del params["TI"]


def parse_hashes(text: str) -> dict[str, str]:
    out = {}
    for part in (text or "").split(","):
        name, sep, value = part.partition(":")
        if sep and name.strip() and value.strip():
            out[name.strip()] = value.strip().lower()
    return out


def remap_pasted(prompt: str, hashes: dict[str, str], resolve) -> str:
    """Rewrite tag names whose recorded hash belongs to a file with another name.

    `resolve(name, short_hash) -> name or None`: the name of the file to use (None: leave as is).
    """
    def sub(match):
        try:
            tag = parse_tag_body(match.group(1))
        except ValueError:
            return match.group(0)
        short = hashes.get(tag.name)
        if not short:
            return match.group(0)
        new = resolve(tag.name, short)
        if not new or new == tag.name:
            return match.group(0)
        body = match.group(1)
        return match.group(0).replace(body, new + body[len(body.split(":", 1)[0]):], 1)

    return TAG_RE.sub(sub, prompt or "")


# ---- the activation lifecycle --------------------------------------------------------------------
class Activator:
    def __init__(self, store: ConceptStore, env):
        self.store = store
        self.env = env
        self.handles: list = []
        self.words: list[str] = []
        self.edits: Edits | None = None
        # what this pass runs, for the sampler's step callback (schedules) and the gate inspector
        self.p = None
        self.hires = False
        self.pass_concepts: dict[str, ResolvedConcept] = {}
        self.pass_words: dict[str, str] = {}
        self.competitive = False  # competitive gates on this pass (the setting, with two or more concepts)
        self.inspect_pending = False
        self.restore_conditioning = None  # undoes the clause-wise encoding wrapper while one is installed

    # ---- cleanup ---------------------------------------------------------------------------
    def release(self) -> None:
        """Remove hooks and registered words (idempotent)."""
        if self.handles:
            detach(self.handles)
        if self.restore_conditioning is not None:
            self.restore_conditioning()
            self.restore_conditioning = None
        self.edits, self.p, self.pass_concepts, self.pass_words, self.inspect_pending = None, None, {}, {}, False
        for word in self.words:
            try:
                self.env.unregister_embedding(word)
            except Exception:  # a model switch may have dropped the database already
                log.debug("could not unregister %s", word, exc_info=True)
        self.words = []

    @property
    def active(self) -> bool:
        return bool(self.handles or self.words or self.restore_conditioning)

    def on_step(self, step: int, total: int) -> bool:
        """The sampler is about to run step `step` of `total` of this pass: move scheduled gates there."""
        if self.edits is None or not self.edits.scheduled or not total:
            return False
        return self.edits.set_progress(min(max(step / total, 0.0), 1.0))

    # ---- activation ------------------------------------------------------------------------
    def activate(self, p) -> None:
        self.release()
        hr = bool(getattr(p, "is_hr_pass", False))
        sources = self._sources(p)
        collected = collect({k: raws for k, (_, raws, _) in sources.items()})
        warnings = list(collected.warnings)
        if not collected.tags and not warnings:
            return
        self.env.on_activate(p, self)
        model_family_name = self._model_family(warnings)
        defaults = self.env.defaults()
        resolved, hashes = {}, {}
        for name, tag in collected.tags.items():
            try:
                entry = self.store.load(name)
            except PerfusionError as exc:
                warnings.append(f"<perfusion:{name}> skipped: {exc}")
                continue
            concept = entry.concept
            reason = mismatch_reason(concept.base_family, model_family_name)
            if reason:
                warnings.append(f"<perfusion:{name}> skipped: {reason}")
                continue
            # β/τ: the tag's value or schedule for this pass (hr_beta= on the hires pass), else the setting, else
            # the file's default; a schedule's points before its first fraction use that default too
            beta, beta_schedule = gate_settings(tag.schedule("beta", hires=hr), defaults.get("beta") or concept.beta)
            tau, tau_schedule = gate_settings(tag.schedule("tau", hires=hr), defaults.get("tau") or concept.tau)
            resolved[name] = ResolvedConcept(concept, tag.strength, beta, tau, beta_schedule, tau_schedule)
            hashes[name] = entry.sha256

        clauses = bool(defaults.get("clause_encoding")) and len(resolved) > 1
        words = {name: concept_word(name, hashes[name], clauses) for name in resolved}
        for name, entry in resolved.items():
            self.env.register_embedding(words[name], entry.concept)
            self.words.append(words[name])
        if clauses:
            self._encode_by_clauses(p, resolved, words, warnings)

        for key, (attr, raws, strip) in sources.items():
            current = getattr(p, attr, None)
            if current is None or not raws:
                continue
            setattr(p, attr, [self._rewrite(cur, raw, words, strip, key, warnings)
                              for cur, raw in zip(current, raws)])

        pass_keys = ("hires prompt", "hires negative prompt") if hr else ("prompt", "negative prompt")
        pass_names = []
        for key in pass_keys:
            for raw in sources.get(key, (None, [], None))[1]:
                for tag in scan(raw)[0]:
                    if tag.name in resolved and tag.name not in pass_names:
                        pass_names.append(tag.name)
        replaced = self.env.unet_replacement()
        if pass_names and replaced:
            warnings.append(
                f"the UNet replacement {replaced!r} is active (TensorRT or similar): the torch UNet does not run, so "
                f"{', '.join(f'<perfusion:{n}>' for n in pass_names)} only adds the concept word, not its K/V edits. "
                "Set SD UNet to None (or export the concept into the engine) to use Perfusion."
            )
        elif pass_names:
            try:
                self.competitive = bool(defaults.get("competitive_gates")) and len(pass_names) > 1
                self.edits = prepare_edits(self.env.unet(), [resolved[n] for n in pass_names], self.competitive)
                self.handles = attach(self.edits.edits)
            except PerfusionError as exc:
                warnings.append(f"Perfusion concepts not applied: {exc}")
            else:
                self.p, self.hires = p, hr
                self.pass_concepts = {n: resolved[n] for n in pass_names}
                self.pass_words = {n: words[n] for n in pass_names}
                self.inspect_pending = True

        if hashes:
            recorded = dict(getattr(p, "_perfusion_hashes", {}) or {})
            recorded.update(hashes)
            p._perfusion_hashes = recorded
            p.extra_generation_params[INFOTEXT_KEY] = format_hashes(recorded)
        for w in warnings:
            self.env.warn(p, w)

    def _encode_by_clauses(self, p, resolved: dict, words: dict, warnings: list) -> None:
        """Register every concept's stand-in word (its superclass) and wrap the model's conditioning so that each
        further concept's clause is read after the stand-ins of the concepts before it (clause_conditioning.py)."""
        try:
            for name, entry in resolved.items():
                word = stand_in_word(words[name])
                self.env.register_vectors(word, self.env.superclass_vectors(entry.concept), word)
                self.words.append(word)
            self.restore_conditioning = self.env.wrap_conditioning(lambda original: ClauseConditioning(
                original, lambda text: self.env.token_layout(text)[1], list(words.values())))
        except Exception as exc:  # noqa: BLE001 - the plain encoding still gives an image
            warnings.append(f"clause-wise encoding not applied: {exc}")
            return
        p.extra_generation_params[CLAUSES_KEY] = True

    def _model_family(self, warnings) -> str | None:
        try:
            return unet_family(self.env.unet())
        except Exception as exc:  # noqa: BLE001 - no model, or an unknown architecture
            warnings.append(f"cannot inspect the loaded model ({exc})")  # env.warn adds "Perfusion: "
            return None

    @staticmethod
    def _sources(p) -> dict[str, tuple[str, list[str], bool]]:
        """key -> (attribute to rewrite, raw prompts of this batch, whether the WebUI strips its tags)."""
        n, bs = int(getattr(p, "iteration", 0) or 0), int(getattr(p, "batch_size", 1) or 1)
        sl = slice(n * bs, (n + 1) * bs)

        def raw(name):
            values = getattr(p, name, None)
            return list(values[sl]) if values else []

        out = {
            "prompt": ("prompts", raw("all_prompts"), True),
            "negative prompt": ("negative_prompts", raw("all_negative_prompts"), False),
        }
        if getattr(p, "enable_hr", False) and getattr(p, "all_hr_prompts", None):
            out["hires prompt"] = ("hr_prompts", raw("all_hr_prompts"), True)
            out["hires negative prompt"] = ("hr_negative_prompts", raw("all_hr_negative_prompts"), False)
        return out

    def _rewrite(self, current: str, raw: str, words, strip: bool, key: str, warnings) -> str:
        """The prompt to encode: the raw one with concept words in place of tags (other tags stripped)."""
        if not scan(raw)[0] and "<perfusion:" not in raw.lower():
            return current
        expected = self.env.strip_tags(raw) if strip else raw
        rebuilt = replace_tags(raw, words)
        rebuilt = self.env.strip_tags(rebuilt) if strip else rebuilt
        if current in (expected, rebuilt):
            return rebuilt
        if "<perfusion:" in current.lower():  # changed by another script but tags still there
            return replace_tags(current, words)
        warnings.append(f"the {key} was changed by another script after the tags were removed; "
                        "Perfusion concept words could not be placed in it")
        return current
