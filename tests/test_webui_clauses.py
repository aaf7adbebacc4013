"""Clause-wise encoding in the WebUI glue: the Activator's wrapper around the model's conditioning, given a
WebUI-like text path (concept words as registered embeddings, the WebUI reading one text at a time), gives
what `core.clauses` gives for the tag prompt; one-concept texts, the pooled SDXL vector and the model after
release are untouched."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import make_concept, tiny_ldm_unet
from test_webui_glue import FakeEnv, FakeP

from perfusion_ext.core.clauses import encode_clauses
from perfusion_ext.core.concept import save_concept
from perfusion_ext.core.layers import unet_family
from perfusion_ext.core.tags import ConceptTag, parse_prompt
from perfusion_ext.core.text import PromptEncoder
from perfusion_ext.webui.activation import CLAUSES_KEY, Activator, concept_word
from perfusion_ext.webui.clause_conditioning import ClauseConditioning, clause_variants, stand_in_word, variant_text
from perfusion_ext.webui.concepts import ConceptStore

TWO = "a <perfusion:house> on the left, a <perfusion:lollipop> on the right, green background"
SUPERCLASSES = {"house": "circle", "lollipop": "square"}


class TextEnv(FakeEnv):
    """FakeEnv with a text encoder: prompts are encoded as text in which registered words are embeddings."""

    def __init__(self, unet, encoder, clause_encoding=True):
        super().__init__(unet)
        self.encoder, self.clause_encoding = encoder, clause_encoding
        self.vectors = {}
        self.conditioning = self.plain

    def register_embedding(self, word, concept):
        super().register_embedding(word, concept)
        self.vectors[word] = concept.embeddings["clip_l"]

    def register_vectors(self, word, vectors, filename):
        self.vectors[word] = vectors["clip_l"]

    def unregister_embedding(self, word):
        super().unregister_embedding(word)
        self.vectors.pop(word, None)

    def superclass_vectors(self, concept):
        vectors = concept.embeddings["clip_l"]
        return {"clip_l": self.encoder.word_vector(concept.superclass).expand(vectors.shape[0], -1)}

    def segments(self, text):
        if not self.vectors:
            return [text]
        pattern = "|".join(sorted(map(re.escape, self.vectors), key=len, reverse=True))
        return [ConceptTag(part) if part in self.vectors else part
                for part in re.split(rf"\b({pattern})\b", text) if part]

    def plain(self, texts):
        return self.encoder.encode([self.segments(t) for t in texts], self.vectors).hidden

    def token_layout(self, text):
        return [], self.encoder.encode([self.segments(text)], self.vectors).concept_positions[0]

    def wrap_conditioning(self, make):
        self.conditioning = make(self.plain)

        def restore():
            self.conditioning = self.plain
        return restore

    def defaults(self):
        return {**super().defaults(), "clause_encoding": self.clause_encoding}


@pytest.fixture(scope="module")
def encoder(pipe):
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder)


@pytest.fixture(scope="module")
def unet(pipe):
    return tiny_ldm_unet(context_dim=pipe.text_encoder.config.hidden_size)


@pytest.fixture()
def concepts(tmp_path, unet):
    for seed, (name, superclass) in enumerate(SUPERCLASSES.items(), start=1):
        concept = make_concept(unet, name, seed=seed, superclass=superclass, family=unet_family(unet))
        save_concept(concept, tmp_path / f"{name}.safetensors")
    return tmp_path


def activate(concepts, env, prompts):
    activator = Activator(ConceptStore(lambda: concepts), env)
    p = FakeP(prompts, [""] * len(prompts), batch_size=len(prompts))
    activator.activate(p)
    return activator, p


def test_webui_conditioning_equals_the_core_clause_encoding(concepts, unet, encoder):
    env = TextEnv(unet, encoder)
    activator, p = activate(concepts, env, [TWO, "a <perfusion:house> on the left, red background"])
    embeddings = {name: activator.store.load(name).concept.embeddings["clip_l"] for name in SUPERCLASSES}
    words = {c.name: w for w, c in env.registered.items()}
    assert all(w.endswith("z") for w in words.values())
    assert env.warnings == [] and p.extra_generation_params[CLAUSES_KEY] is True

    wrapped, plain = env.conditioning(p.prompts), env.plain(p.prompts)
    reference = encode_clauses(encoder, parse_prompt(TWO).segments, embeddings, SUPERCLASSES)
    assert wrapped.shape == plain.shape and wrapped.shape[1:] == reference.hidden.shape[1:]
    assert torch.allclose(wrapped[0], reference.hidden[0], atol=1e-5)
    second = reference.concept_positions[0]["lollipop"][0]
    assert torch.equal(wrapped[0, :second], plain[0, :second])
    assert (wrapped[0, second:] - plain[0, second:]).abs().max() > 1e-2
    assert torch.equal(wrapped[1], plain[1])  # one concept: untouched
    assert env.conditioning.applied == 1

    activator.release()
    assert env.conditioning == env.plain and not env.registered and not env.vectors


@pytest.mark.parametrize("setting, prompt", [(False, TWO), (True, "a <perfusion:house> on the left, blue background")])
def test_without_the_setting_or_a_second_concept_nothing_is_wrapped(concepts, unet, encoder, setting, prompt):
    env = TextEnv(unet, encoder, clause_encoding=setting)
    activator, p = activate(concepts, env, [prompt])
    assert env.conditioning == env.plain and CLAUSES_KEY not in p.extra_generation_params
    assert not any(w.endswith("z") for w in env.registered)
    assert not any(w.startswith("perfusionsuperclass") for w in env.vectors)
    activator.release()


def test_a_failing_stand_in_warns_and_keeps_the_plain_encoding(concepts, unet, encoder):
    env = TextEnv(unet, encoder)

    def broken(concept):
        raise RuntimeError("no text encoder here")

    env.superclass_vectors = broken
    activator, p = activate(concepts, env, [TWO])
    assert env.conditioning == env.plain and CLAUSES_KEY not in p.extra_generation_params
    assert any("clause-wise encoding not applied: no text encoder here" in w for w in env.warnings)
    activator.release()
    assert not env.vectors


def test_variants_replace_only_the_earlier_words_before_the_clause():
    text = "a perfusionhousez beside perfusionlollyz and perfusionhousez again"
    assert variant_text(text, ["perfusionhousez"], text.index("perfusionlollyz")) == (
        f"a {stand_in_word('perfusionhousez')} beside perfusionlollyz and perfusionhousez again")
    positions = {"perfusionhousez": [2, 9], "perfusionlollyz": [5]}
    (variant, start), = clause_variants(text, ["perfusionhousez", "perfusionlollyz"], positions)
    assert start == 5 and variant.startswith(f"a {stand_in_word('perfusionhousez')} beside")
    assert stand_in_word("perfusionhousez") == "perfusionsuperclasshousez"
    assert concept_word("house", "ab" * 32, True) == concept_word("house", "ab" * 32) + "z"


def test_sdxl_dict_keeps_its_pooled_vector_and_the_batch_attributes():
    class Texts(list):
        negative = True

    seen = []

    def original(texts):
        seen.append((list(texts), getattr(texts, "negative", None)))
        marker = torch.tensor([[1.0] if "superclass" in t else [0.0] for t in texts])
        return {"crossattn": marker[:, None, :].expand(-1, 10, 4).clone(), "vector": torch.arange(len(texts) * 3.0)}

    layout = {"a perfusionaz x perfusionbz": {"perfusionaz": [1], "perfusionbz": [3]}}
    wrapper = ClauseConditioning(original, layout.get, ["perfusionaz", "perfusionbz"])
    out = wrapper(Texts(["a perfusionaz x perfusionbz"]))
    assert seen[1] == (["a perfusionsuperclassaz x perfusionbz"], True)
    assert out["crossattn"][0, :3].abs().sum() == 0 and (out["crossattn"][0, 3:] == 1).all()
    assert torch.equal(out["vector"], torch.arange(3.0))


def test_a_failing_variant_encoding_keeps_the_prompts_own_conditioning():
    calls = []

    def original(texts):
        calls.append(list(texts))
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return torch.ones(len(texts), 10, 4)

    layout = {"a perfusionaz x perfusionbz": {"perfusionaz": [1], "perfusionbz": [3]}}
    out = ClauseConditioning(original, layout.get, ["perfusionaz", "perfusionbz"])(["a perfusionaz x perfusionbz"])
    assert len(calls) == 2 and torch.equal(out, torch.ones(1, 10, 4))
