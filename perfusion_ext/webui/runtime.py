"""What a `<perfusion:...>` tag does during a WebUI generation, free of WebUI imports.

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

The WebUI side is an `env` object (see extra_network.WebuiEnv): sd_model/unet access, embedding
registration, the WebUI's own tag stripper, warnings.
"""
from __future__ import annotations

import logging

from ..errors import PerfusionError
from ..hooks import ResolvedConcept, attach, build_edits, detach
from ..layers import cross_attention_layers, model_family
from . import prompts as prompt_glue
from .concepts import ConceptStore, mismatch_reason

log = logging.getLogger("perfusion")


class Activator:
    def __init__(self, store: ConceptStore, env):
        self.store = store
        self.env = env
        self.handles: list = []
        self.words: list[str] = []

    # ---- cleanup ---------------------------------------------------------------------------
    def release(self) -> None:
        """Remove hooks and registered words (idempotent)."""
        if self.handles:
            detach(self.handles)
        for word in self.words:
            try:
                self.env.unregister_embedding(word)
            except Exception:  # noqa: BLE001 - a model switch may have dropped the database already
                log.debug("could not unregister %s", word, exc_info=True)
        self.words = []

    @property
    def active(self) -> bool:
        return bool(self.handles or self.words)

    # ---- activation ------------------------------------------------------------------------
    def activate(self, p) -> None:
        self.release()
        hr = bool(getattr(p, "is_hr_pass", False))
        sources = self._sources(p)
        collected = prompt_glue.collect({k: raws for k, (_, raws, _) in sources.items()})
        warnings = list(collected.warnings)
        if not collected.tags and not warnings:
            return
        self.env.on_activate(p, self)
        model_family_name = self._model_family(warnings)
        defaults = self.env.defaults()
        resolved, words, hashes = {}, {}, {}
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
            beta = tag.beta if tag.beta is not None else (defaults.get("beta") or concept.beta)
            tau = tag.tau if tag.tau is not None else (defaults.get("tau") or concept.tau)
            resolved[name] = ResolvedConcept(concept, tag.strength, float(beta), float(tau))
            words[name] = prompt_glue.concept_word(name, entry.sha256)
            hashes[name] = entry.sha256

        for name, entry in resolved.items():
            self.env.register_embedding(words[name], entry.concept)
            self.words.append(words[name])

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
                for tag in prompt_glue.scan(raw)[0]:
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
                edits = build_edits(self.env.unet(), [resolved[n] for n in pass_names])
                self.handles = attach(edits)
            except PerfusionError as exc:
                warnings.append(f"Perfusion concepts not applied: {exc}")

        if hashes:
            recorded = dict(getattr(p, "_perfusion_hashes", {}) or {})
            recorded.update(hashes)
            p._perfusion_hashes = recorded
            p.extra_generation_params[prompt_glue.INFOTEXT_KEY] = prompt_glue.format_hashes(recorded)
        for w in warnings:
            self.env.warn(p, w)

    def _model_family(self, warnings) -> str | None:
        try:
            return model_family(cross_attention_layers(self.env.unet()))
        except Exception as exc:  # noqa: BLE001 - no model, or an unknown architecture
            warnings.append(f"Perfusion: cannot inspect the loaded model ({exc})")
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
        if not prompt_glue.scan(raw)[0] and "<perfusion:" not in raw.lower():
            return current
        expected = self.env.strip_tags(raw) if strip else raw
        rebuilt = prompt_glue.replace_tags(raw, words)
        rebuilt = self.env.strip_tags(rebuilt) if strip else rebuilt
        if current in (expected, rebuilt):
            return rebuilt
        if "<perfusion:" in current.lower():  # changed by another script but tags still there
            return prompt_glue.replace_tags(current, words)
        warnings.append(f"the {key} was changed by another script after the tags were removed; "
                        "Perfusion concept words could not be placed in it")
        return current
