"""Clause-wise encoding: each further concept's clause encoded as if the concepts before it were their
superclass words; the first clause, one-concept prompts and token positions untouched."""
import json

import pytest
import torch
from conftest import make_concept
from tiny_families import tiny_sdxl_pipeline

import perfusion_ext as pf
import perfusion_ext.pipelines.loading as loading
from perfusion_ext.cli import main as cli_main
from perfusion_ext.core.clauses import encode_clauses
from perfusion_ext.core.tags import parse_prompt
from perfusion_ext.core.text import MultiPromptEncoder, PromptEncoder
from perfusion_ext.pipelines.encoding import prompt_encoder
from perfusion_ext.pipelines.generate import generate
from perfusion_ext.pipelines.inspect import inspect_prompt

TWO = "a <perfusion:house> on the left, a <perfusion:lollipop> on the right, green background"


def vectors(seed, dim=128):
    return torch.randn(1, dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def encoder(pipe):
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder)


def encode(encoder, prompt, embeddings, superclasses, **kw):
    return encode_clauses(encoder, parse_prompt(prompt).segments, embeddings, superclasses, **kw)


def test_each_clause_reads_the_earlier_concepts_as_their_superclass_words(encoder):
    embeddings = {"house": vectors(1), "lollipop": vectors(2)}
    superclasses = {"house": "circle", "lollipop": "square"}
    clauses = encode(encoder, TWO, embeddings, superclasses)
    plain = encoder.encode([parse_prompt(TWO).segments], embeddings)
    # the same prompt written with the house's superclass word: what the lollipop's clause must read
    written = TWO.replace("<perfusion:house>", "circle")
    reference = encoder.encode([parse_prompt(written).segments], {"lollipop": embeddings["lollipop"]})
    assert clauses.concept_positions == plain.concept_positions
    second = plain.concept_positions[0]["lollipop"][0]
    assert torch.equal(clauses.hidden[:, :second], plain.hidden[:, :second])
    assert torch.allclose(clauses.hidden[:, second:], reference.hidden[:, second:], atol=1e-6)
    assert (clauses.hidden[:, second:] - plain.hidden[:, second:]).abs().max() > 1e-2  # it changed something


def test_one_concept_is_encoded_exactly_as_without(encoder):
    embeddings = {"house": vectors(1)}
    prompt = "a <perfusion:house> on the left, green background"
    plain = encoder.encode([parse_prompt(prompt).segments], embeddings)
    assert torch.equal(encode(encoder, prompt, embeddings, {"house": "circle"}).hidden, plain.hidden)


def test_a_multi_token_superclass_enters_as_its_mean_vector_and_positions_stay(encoder):
    word = "red circle"
    ids = encoder.token_windows.words(word)
    assert len(ids) == 2
    table = encoder.text_encoder.get_input_embeddings().weight
    assert torch.allclose(encoder.word_vector(word), table[ids].mean(0, keepdim=True))
    embeddings = {"house": vectors(1), "lollipop": vectors(2)}
    clauses = encode(encoder, TWO, embeddings, {"house": word, "lollipop": "square"})
    stand_in = {"house": encoder.word_vector(word), "lollipop": embeddings["lollipop"]}
    reference = encoder.encode([parse_prompt(TWO).segments], stand_in)
    second = clauses.concept_positions[0]["lollipop"][0]
    assert clauses.hidden.shape == reference.hidden.shape
    assert torch.allclose(clauses.hidden[:, second:], reference.hidden[:, second:], atol=1e-6)


def test_a_concept_named_again_later_keeps_its_own_vectors_there(encoder):
    prompt = "a <perfusion:house> and a <perfusion:lollipop> beside a <perfusion:house>, blue background"
    embeddings = {"house": vectors(1), "lollipop": vectors(2)}
    clauses = encode(encoder, prompt, embeddings, {"house": "circle", "lollipop": "square"})
    # by hand: only the first house is its superclass word; the second keeps the learned vector
    written = prompt.replace("<perfusion:house>", "circle", 1)
    reference = encoder.encode([parse_prompt(written).segments], embeddings)
    second = clauses.concept_positions[0]["lollipop"][0]
    assert clauses.concept_positions[0]["house"] == [2, second + 3]  # BOS, "a", house … "beside", "a", house
    assert torch.allclose(clauses.hidden[:, second:], reference.hidden[:, second:], atol=1e-6)


def test_three_concepts_each_clause_from_its_own_variant(encoder):
    prompt = "a <perfusion:a> , a <perfusion:b> , a <perfusion:c> , white background"
    embeddings = {n: vectors(i) for i, n in enumerate("abc")}
    superclasses = {"a": "circle", "b": "square", "c": "triangle"}
    clauses = encode(encoder, prompt, embeddings, superclasses)
    positions = clauses.concept_positions[0]
    b, c = positions["b"][0], positions["c"][0]
    only_b = encoder.encode([parse_prompt(prompt.replace("<perfusion:a>", "circle")).segments], embeddings)
    only_c = encoder.encode([parse_prompt(prompt.replace("<perfusion:a>", "circle")
                                          .replace("<perfusion:b>", "square")).segments], embeddings)
    assert torch.allclose(clauses.hidden[:, b:c], only_b.hidden[:, b:c], atol=1e-6)
    assert torch.allclose(clauses.hidden[:, c:], only_c.hidden[:, c:], atol=1e-6)


def test_both_sdxl_encoders_read_the_clauses(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    encoder = prompt_encoder(pipe)
    assert isinstance(encoder, MultiPromptEncoder)
    widths = {part.name: part.text_encoder.get_input_embeddings().weight.shape[1] for part in encoder.parts}
    embeddings = {n: {name: torch.randn(1, w) for name, w in widths.items()} for n in ("house", "lollipop")}
    prompt = "a <perfusion:house> on the left, a <perfusion:lollipop> on the right"
    clauses = encode(encoder, prompt, embeddings, {"house": "dog", "lollipop": "cat"})
    plain = encoder.encode([parse_prompt(prompt).segments], embeddings)
    stand_in = {"house": {p.name: p.word_vector("dog") for p in encoder.parts}, "lollipop": embeddings["lollipop"]}
    reference = encoder.encode([parse_prompt(prompt).segments], stand_in)
    second = plain.concept_positions[0]["lollipop"][0]
    assert torch.equal(clauses.hidden[:, :second], plain.hidden[:, :second])
    assert torch.allclose(clauses.hidden[:, second:], reference.hidden[:, second:], atol=1e-5)
    assert torch.equal(clauses.pooled, plain.pooled)  # the pooled output stays the prompt's own


def test_inspect_and_generate_take_the_option(pipe, tmp_path, capsys, monkeypatch):
    for seed, (name, word) in enumerate((("house", "circle"), ("lollipop", "square")), 1):
        concept = make_concept(pipe.unet, name=name, seed=seed, family="toy", superclass=word)
        concept.embeddings = {"clip_l": vectors(seed)}
        pf.save_concept(concept, tmp_path / f"{name}.safetensors")
    plain = inspect_prompt(pipe, TWO, concepts_dir=tmp_path)
    clauses = inspect_prompt(pipe, TWO, concepts_dir=tmp_path, clause_encoding=True)
    second = next(t["index"] for t in plain["tokens"] if t["text"] == "<perfusion:lollipop>")
    assert [t["s"] for t in clauses["tokens"][:second]] == [t["s"] for t in plain["tokens"][:second]]
    assert clauses["tokens"][second]["s"] != plain["tokens"][second]["s"]
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pipe)
    assert cli_main(["inspect", "--concepts", str(tmp_path), "--prompt", TWO, "--json", "--clause-encoding"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == clauses["tokens"]
    # one concept: the same image with and without
    one = "a <perfusion:house> on the left, green background"
    settings = dict(concepts_dir=tmp_path, seed=3, num_inference_steps=2)
    with_, _ = generate(pipe, one, clause_encoding=True, **settings)
    without, _ = generate(pipe, one, **settings)
    assert with_[0].tobytes() == without[0].tobytes()


def test_a_clause_in_the_second_clip_window_is_spliced_there(encoder):
    filler = " ".join(["red"] * 80)
    prompt = f"a <perfusion:house> on the left, {filler}, a <perfusion:lollipop> on the right"
    embeddings = {"house": vectors(1), "lollipop": vectors(2)}
    clauses = encode(encoder, prompt, embeddings, {"house": "circle", "lollipop": "square"})
    plain = encoder.encode([parse_prompt(prompt).segments], embeddings)
    reference = encoder.encode([parse_prompt(prompt.replace("<perfusion:house>", "circle")).segments],
                               {"lollipop": embeddings["lollipop"]})
    second = plain.concept_positions[0]["lollipop"][0]
    assert plain.hidden.shape[1] == 154 and second > 77  # the lollipop sits in the second window
    assert torch.equal(clauses.hidden[:, :second], plain.hidden[:, :second])
    assert torch.allclose(clauses.hidden[:, second:], reference.hidden[:, second:], atol=1e-6)
