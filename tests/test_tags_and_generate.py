"""Tag grammar, concept lookup inside the concepts folder, and generation with tags (toy architecture)."""
import numpy as np
import pytest
import torch
from conftest import make_concept

import perfusion_ext as pf
from perfusion_ext.cli import main as cli_main
from perfusion_ext.core.library import concept_path
from perfusion_ext.core.tags import ConceptTag, format_tag, parse_prompt, parse_tag_body
from perfusion_ext.core.text import PromptEncoder
from perfusion_ext.pipelines.generate import generate, prepare_prompt
from perfusion_ext.toy.plugin import tiny_random_pipeline


def test_tag_grammar():
    assert parse_tag_body("teddy") == ConceptTag("teddy")
    assert parse_tag_body("teddy:0.8") == ConceptTag("teddy", 0.8)
    assert parse_tag_body("teddy:0.5:beta=0.6:tau=0.2") == ConceptTag("teddy", 0.5, 0.6, 0.2)
    assert parse_tag_body("my teddy-2:beta=0.65") == ConceptTag("my teddy-2", 1.0, 0.65, None)
    for bad, why in (("../etc", "invalid concept name"), ("teddy:abc", "bad option"), ("teddy:gamma=1", "unknown option"),
                     ("teddy:tau=0", "tau must be > 0"), ("", "invalid concept name")):
        with pytest.raises(ValueError, match=why):
            parse_tag_body(bad)
    parsed = parse_prompt("a photo of <perfusion:teddy:0.7> and <perfusion:ring> on <perfusion:x:bad>, blue")
    assert [t.name for t in parsed.tags] == ["teddy", "ring"] and len(parsed.warnings) == 1
    assert parsed.text_with(lambda t: t.name.upper()) == "a photo of TEDDY and RING on , blue"
    assert format_tag("teddy", 0.5, beta=0.6) == "<perfusion:teddy:0.5:beta=0.6>"
    assert parse_tag_body(format_tag("teddy", 0.5, 0.6, 0.2)[len("<perfusion:"):-1]) == ConceptTag("teddy", 0.5, 0.6, 0.2)


def test_concept_names_never_escape_the_folder(tmp_path):
    folder = tmp_path / "concepts"
    folder.mkdir()
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    (folder / "link.safetensors").symlink_to(outside)
    for name in ("../secret", "/etc/passwd", "..", "a/../../secret"):
        with pytest.raises(pf.PerfusionError, match="invalid concept name|outside"):
            concept_path(folder, name)
    with pytest.raises(pf.PerfusionError, match="outside the concepts folder"):
        concept_path(folder, "link")
    with pytest.raises(pf.PerfusionError, match="unknown concept 'nope'"):
        concept_path(folder, "nope")
    (folder / "sub").mkdir()
    (folder / "sub" / "teddy.safetensors").write_bytes(b"x")
    assert concept_path(folder, "teddy") == (folder / "sub" / "teddy.safetensors").resolve()


def test_plain_prompt_encoding_matches_the_pipeline(pipe):
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    with torch.no_grad():
        ours = encoder.encode([["a red circle on the left, blue background"]]).hidden
        ref = pipe.encode_prompt("a red circle on the left, blue background", "cpu", 1, False)[0]
    assert torch.equal(ours, ref)


def test_tag_stands_for_the_concept_word(pipe):
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    vector = pipe.text_encoder.get_input_embeddings().weight[7117].detach()[None]  # the word "circle"
    with torch.no_grad():
        tagged = encoder.encode([["a red ", ConceptTag("c"), " on the left"]], {"c": vector})
        plain = encoder.encode([["a red circle on the left"]])
    assert tagged.concept_positions == [{"c": [3]}]
    assert torch.allclose(tagged.hidden, plain.hidden, atol=1e-6)
    long = encoder.encode([[" ".join(["red circle"] * 50)]])
    assert long.hidden.shape[1] == 154


def test_generation_with_tags_and_bad_tags(pipe, toy_teddy_dir):
    base, warnings = generate(pipe, "a red circle on the left, blue background", concepts_dir=toy_teddy_dir, seed=1)
    assert warnings == [] and base[0].size == (32, 32)
    bad, warnings = generate(pipe, "a red circle on the left, blue background <perfusion:nope> <perfusion:x:zz>",
                             concepts_dir=toy_teddy_dir, seed=1)
    assert len(warnings) == 2 and "unknown concept 'nope'" in " ".join(warnings)
    assert np.array_equal(np.asarray(bad[0]), np.asarray(base[0]))  # bad tags change nothing
    tagged, warnings = generate(pipe, "a <perfusion:teddy> on the left, blue background", concepts_dir=toy_teddy_dir, seed=1)
    assert not np.array_equal(np.asarray(tagged[0]), np.asarray(base[0]))
    # a random concept: its i* is nowhere near its word's encoding, and the gate inspector says so
    assert any("<perfusion:teddy>'s gate on its own token is only" in w for w in warnings)
    assert all("<perfusion:teddy>" in w for w in warnings)
    after, _ = generate(pipe, "a red circle on the left, blue background", concepts_dir=toy_teddy_dir, seed=1)
    assert np.array_equal(np.asarray(after[0]), np.asarray(base[0]))  # nothing leaked
    _, warnings = generate(pipe, "a red circle", negative="<perfusion:teddy>, blurry", concepts_dir=toy_teddy_dir)
    assert any("negative prompt" in w for w in warnings)


def test_prepare_prompt_first_tag_options_win(toy_teddy_dir):
    prepared = prepare_prompt("<perfusion:teddy:0.5:beta=0.6> and <perfusion:teddy:1.0>", toy_teddy_dir)
    from perfusion_ext.pipelines.generate import concept_entries

    (entry,) = concept_entries(prepared)
    assert entry[1:] == (0.5, 0.6, None)


def test_cli_generate_and_inspect(toy_teddy_dir, tmp_path, capsys, monkeypatch):
    import perfusion_ext.pipelines.loading as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "load_pipeline", lambda *a, **k: tiny_random_pipeline())
    out = tmp_path / "out"
    code = cli_main(["generate", "--model", "toy", "--concepts", str(toy_teddy_dir), "--prompt",
                     "a <perfusion:teddy> <perfusion:ghost> on the left", "--n", "2", "--steps", "3", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "warning: ignored <perfusion:ghost>: unknown concept 'ghost'" in captured.err
    assert len(list(out.glob("*.png"))) == 2


def test_concept_from_another_base_model_only_warns(pipe, tmp_path):
    concept = make_concept(pipe.unet, name="other", family="toy", superclass="circle")
    concept.embeddings = {"clip_l": torch.randn(1, 128)}
    concept.base_hash = "f" * 64
    pf.save_concept(concept, tmp_path / "other.safetensors")
    images, warnings = generate(pipe, "a <perfusion:other>", concepts_dir=tmp_path, num_inference_steps=2)
    assert len(images) == 1 and any("different base model" in w for w in warnings)
