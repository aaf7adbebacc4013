"""Recipe options of the trainer: background protection, the embedding pull, i* from the captions,
flips, and the paper's recipe one flag away."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from perfusion_ext.cli.main import build_parser
from perfusion_ext.core.tags import ConceptTag
from perfusion_ext.toy.concepts import write_training_set
from perfusion_ext.training.config import PAPER_RECIPE, TrainConfig, paper_recipe
from perfusion_ext.training.dataset import load_images
from perfusion_ext.training.trainer import ConceptTrainer


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_training_set("house", tmp_path_factory.mktemp("house"), n=4)


def trainer(random_toy_backend, images, masks=None, **kw):
    kw.setdefault("phrasing_gate", 0.0)  # one term at a time: on a random model its loss dwarfs the others
    cfg = TrainConfig(name="house", superclass="square", steps=2, batch_size=4, preview_every=0, seed=3,
                      masks_dir=masks, **kw).resolved(random_toy_backend.family, random_toy_backend.device)
    return ConceptTrainer(random_toy_backend, cfg, load_images(images, 32, masks_dir=masks))


def first_loss(t: ConceptTrainer) -> float:
    torch.manual_seed(0)
    return t.train_step()


def test_background_term_is_zero_where_the_mask_covers_everything(random_toy_backend, images, tmp_path):
    full = tmp_path / "full_masks"
    full.mkdir()
    for png in images.glob("*.png"):
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(full / png.name)
    assert first_loss(trainer(random_toy_backend, images, str(full), background_distill=5.0)) == pytest.approx(
        first_loss(trainer(random_toy_backend, images, str(full), background_distill=0.0)), rel=1e-6)


def test_background_term_adds_a_loss_outside_the_mask(random_toy_backend, images):
    masks = str(images / "masks")
    plain = first_loss(trainer(random_toy_backend, images, masks, background_distill=0.0))
    protected = first_loss(trainer(random_toy_backend, images, masks, background_distill=5.0))
    assert protected > plain * 1.001
    # without masks there is no background to protect: the option changes nothing
    assert first_loss(trainer(random_toy_backend, images, None, background_distill=5.0)) == pytest.approx(
        first_loss(trainer(random_toy_backend, images, None, background_distill=0.0)), rel=1e-6)


def test_embedding_pull_is_zero_at_the_start_and_pulls_after(random_toy_backend, images):
    pulled = trainer(random_toy_backend, images, embedding_pull=10.0)
    free = trainer(random_toy_backend, images, embedding_pull=0.0)
    assert first_loss(pulled) == pytest.approx(first_loss(free), rel=1e-6)  # e = e_super at step 0
    assert not any(v.requires_grad for v in pulled.superclass_embedding.values())  # the anchor is a constant

    def drift(t):
        return sum(float((e.detach() - t.superclass_embedding[k]).norm()) for k, e in t.embedding.items())

    for _ in range(8):
        pulled.train_step()
        free.train_step()
    # an anchor inside the autograd graph pushed the embedding away (the pull term grew without bound)
    assert drift(pulled) < 0.25 * drift(free)


def test_target_input_starts_from_the_training_captions(random_toy_backend, images, tmp_path):
    from_captions = trainer(random_toy_backend, images, init_from_captions=True)
    generic = trainer(random_toy_backend, images, init_from_captions=False)
    assert from_captions._initial_templates() == [im.caption for im in from_captions.dataset.images]
    assert not torch.allclose(from_captions.i_star, generic.i_star)
    bare = tmp_path / "bare"
    bare.mkdir()
    for png in images.glob("*.png"):
        (bare / png.name).write_bytes(png.read_bytes())
    a, b = trainer(random_toy_backend, bare, init_from_captions=True), trainer(random_toy_backend, bare, init_from_captions=False)
    assert torch.equal(a.i_star, b.i_star)  # no captions: both start from the generic templates


def test_no_flip_never_mirrors(random_toy_backend, images):
    t = trainer(random_toy_backend, images, flip=False)
    seen = []
    original = t._mask_weights
    t._mask_weights = lambda idx, flips, size: seen.extend(flips) or original(idx, flips, size)
    for _ in range(3):
        t.train_step()
    assert seen and not any(seen)


def test_paper_recipe_and_cli_flags():
    cfg = paper_recipe(TrainConfig("x", "dog"))
    assert {k: getattr(cfg, k) for k in PAPER_RECIPE} == PAPER_RECIPE
    assert dataclasses.replace(cfg, **{k: getattr(TrainConfig("x", "dog"), k) for k in PAPER_RECIPE}) == TrainConfig("x", "dog")
    args = build_parser().parse_args(["train", "--images", "d", "--name", "n", "--superclass", "dog", "--no-flip",
                                      "--background-distill", "0.5", "--embedding-pull", "2", "--leak-penalty", "0.3"])
    assert args.flip is False and args.background_distill == 0.5 and args.embedding_pull == 2.0
    assert args.leak_penalty == 0.3 and TrainConfig("x", "dog").leak_penalty == 0.1 and PAPER_RECIPE["leak_penalty"] == 0
    gates = build_parser().parse_args(["train", "--images", "d", "--name", "n", "--superclass", "dog",
                                       "--context-gate", "2", "--phrasing-gate", "1", "--leading-object", "0.3"])
    assert gates.context_gate == 2.0 and gates.phrasing_gate == 1.0 and gates.leading_object == 0.3
    assert TrainConfig("x", "dog").phrasing_gate == 1.0 and PAPER_RECIPE["phrasing_gate"] == 0
    assert build_parser().parse_args(["train", "--images", "d", "--name", "n", "--superclass", "dog"]).flip is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--images", "d", "--name", "n", "--superclass", "dog",
                                   "--background-distill", "-1"])


def gate_similarities(t: ConceptTrainer, templates) -> list[tuple[list[float], set[int]]]:
    """Per caption: s of every token from the gate's own code (core.gated_edit), and the concept's positions."""
    from perfusion_ext.core.gated_edit import gate_edit

    edit = gate_edit([(t.concept(), 0.7, 0.15)])
    enc = t.backend.encode_prompts([t._segments(c, ConceptTag(t.cfg.name)) for c in templates], {t.cfg.name: t.embedding})
    return [([float(v) for v in edit.similarity(enc.hidden[row].detach().double())[:, 0]], set(positions[t.cfg.name]))
            for row, positions in enumerate(enc.concept_positions)]


def per_caption_leak(t: ConceptTrainer, templates) -> list[float]:
    """Σ relu(s − margin)² over each caption's other tokens."""
    from perfusion_ext.training.trainer import LEAK_MARGIN

    return [sum(max(v - LEAK_MARGIN, 0.0) ** 2 for i, v in enumerate(s) if i not in own)
            for s, own in gate_similarities(t, templates)]


def own_similarity(t: ConceptTrainer, templates) -> list[float]:
    return [s[i] for s, own in gate_similarities(t, templates) for i in own]


def test_leak_penalty_is_the_gate_similarity_on_other_tokens(random_toy_backend, images):
    t = trainer(random_toy_backend, images, leak_penalty=1.0)
    for _ in range(3):  # move the embedding away from the superclass's so the neighbours' s changes
        t.train_step()
    batch = ["a photo of a {} on the left", "a {} on a blue background"]
    enc = t.backend.encode_prompts([t._segments(c, ConceptTag("house")) for c in batch], {"house": t.embedding})
    expected = np.mean(per_caption_leak(t, batch + t.leak_templates()))
    assert t._neighbour_leak(enc, t._gate_direction()).item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_leak_penalty_trains_the_neighbours_gate_down(random_toy_backend, images, monkeypatch):
    from perfusion_ext.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "LEAK_MARGIN", 0.0)  # the random model's words barely leak past 0.3
    free, penalised = (trainer(random_toy_backend, images, lr_embedding=0.5, leak_penalty=w) for w in (0.0, 20.0))
    captions = free.leak_templates()
    for _ in range(6):
        free.train_step()
        penalised.train_step()
    left_alone = float(np.mean(per_caption_leak(free, captions)))
    assert left_alone > 0.01  # without the penalty the learned word leaks into its neighbours
    assert float(np.mean(per_caption_leak(penalised, captions))) < 0.5 * left_alone


def test_textual_inversion_has_no_gate_so_no_leak_penalty(random_toy_backend, images):
    plain, weighted = (trainer(random_toy_backend, images, mode="textual_inversion", leak_penalty=w) for w in (0.0, 20.0))
    assert first_loss(plain) == first_loss(weighted)
    for k in plain.embedding:
        assert torch.equal(plain.embedding[k], weighted.embedding[k])


def test_leading_object_puts_another_objects_clause_before_a_share_of_captions(random_toy_backend, images):
    from perfusion_ext.training.trainer import LEADING_CLAUSES

    seen = []
    t = trainer(random_toy_backend, images, leading_object=0.5)
    real = t.backend.encode_prompts
    t.backend.encode_prompts = lambda prompts, embeddings: seen.extend(prompts) or real(prompts, embeddings)
    for _ in range(6):
        t.train_step()
    texts = [segments[0] for segments in seen if isinstance(segments[0], str)]
    leading = [text for text in texts if any(text.startswith(c.replace("{s}", "square")) for c in LEADING_CLAUSES)]
    assert 0 < len(leading) < len(seen)  # some captions, not all
    # off (the default): the captions and the random stream are the plain recipe's, bit for bit
    assert TrainConfig("x", "dog").leading_object == 0.0 and PAPER_RECIPE["leading_object"] == 0.0
    assert first_loss(trainer(random_toy_backend, images)) == first_loss(
        trainer(random_toy_backend, images, leading_object=0.0))


def test_context_and_phrasing_gates_are_the_own_token_shortfall(random_toy_backend, images):
    from perfusion_ext.training.trainer import CONTEXT_FLOOR, PHRASING_CAPTIONS

    t = trainer(random_toy_backend, images, context_gate=1.0, phrasing_gate=1.0)
    for _ in range(3):
        t.train_step()
    context = t.context_templates()
    assert all(c.index(t.cfg.superclass) < c.index("{}") for c in context)  # the other object comes first
    assert all(any(w in c.split("{}")[0] for w in ("small", "large", "big", "tiny", ",", "of"))
               for c in PHRASING_CAPTIONS)  # a size word or a style prefix comes first
    for captions in (context, list(PHRASING_CAPTIONS)):
        expected = np.mean([max(CONTEXT_FLOOR - v, 0.0) ** 2 for v in own_similarity(t, captions)])
        assert t._own_gate_floor(captions, t._gate_direction()).item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_context_gate_trains_the_own_gate_open_after_another_object(random_toy_backend, images, monkeypatch):
    from perfusion_ext.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "CONTEXT_FLOOR", 3.0)  # the random model's s sits near 1: ask for more
    free, lifted = (trainer(random_toy_backend, images, lr_embedding=0.5, leak_penalty=0.0, context_gate=w)
                    for w in (0.0, 5.0))
    captions = free.context_templates()
    for _ in range(6):
        free.train_step()
        lifted.train_step()
    assert np.mean(own_similarity(lifted, captions)) > np.mean(own_similarity(free, captions)) + 0.1


def test_training_gate_defaults_to_the_inference_gate(random_toy_backend, images, monkeypatch):
    """The edit is trained under the gate it is sampled with (the concept's β, τ) unless one is given;
    the paper's recipe trains under its sharper gate (0.75, 0.1). Checked on what the hooks receive."""
    import perfusion_ext.training.trainer as trainer_module

    seen = []
    real = trainer_module.ResolvedConcept

    def spy(concept, strength, beta, tau):
        seen.append((beta, tau))
        return real(concept, strength, beta, tau)

    monkeypatch.setattr(trainer_module, "ResolvedConcept", spy)
    for kw, gate in (({}, (0.7, 0.15)), ({"beta": 0.6, "tau": 0.2}, (0.6, 0.2)),
                     ({"train_beta": 0.8, "train_tau": 0.05}, (0.8, 0.05))):
        seen.clear()
        first_loss(trainer(random_toy_backend, images, **kw))
        assert set(seen) == {gate}, kw
    assert (paper_recipe(TrainConfig("x", "dog")).train_beta, paper_recipe(TrainConfig("x", "dog")).train_tau) == (0.75, 0.1)
    args = build_parser().parse_args(["train", "--images", "d", "--name", "n", "--superclass", "dog",
                                      "--train-beta", "0.75", "--train-tau", "0.1"])
    assert (args.train_beta, args.train_tau) == (0.75, 0.1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--images", "d", "--name", "n", "--superclass", "dog", "--train-tau", "0"])
