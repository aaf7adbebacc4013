"""The quality benchmark's prompts and its smoke run (the full run is `python -m benchmarks.quality`)."""
import json

import numpy as np
import pytest

from benchmarks import quality
from perfusion_ext.toy.concepts import CONCEPTS, CONTROLS, get_concept, training_scenes


@pytest.mark.parametrize("name", list(CONCEPTS) + list(CONTROLS))
def test_unseen_prompts(name):
    prompts = quality.unseen_prompts(name)
    assert len(prompts) >= 30 and len({p for p, _, _ in prompts}) == len(prompts)
    seen = {(s["background"], s["position"]) for s in training_scenes(name)}
    assert all((bg, pos) not in seen and bg in get_concept(name).readable_backgrounds() for _, bg, pos in prompts)
    assert all(p.count("{}") == 1 for p, _, _ in prompts)
    assert any(p.startswith(bg) for p, bg, _ in prompts) and any(" small " in p for p, _, _ in prompts)


@pytest.mark.slow
def test_quick_run_writes_every_figure_and_resumes(tmp_path):
    out = tmp_path / "quality.json"
    run = ["--quick", "--training-seeds", "2", "--out", str(out), "--work", str(tmp_path / "work")]
    assert quality.main(run) == 0
    report = json.loads(out.read_text())
    assert report["complete"] and report["rows"] == ["perfusion", "textual_inversion"]
    entry = report["concepts"]["house"]
    assert set(entry["ceilings"]) == {"vae_round_trip", "spelled_out", "superclass_word"}
    # the superclass word is judged only on the prompts whose background shows both parts of its object
    assert 0 < entry["ceilings"]["superclass_word"]["n"] <= 4
    for row in ("base", "perfusion", "textual_inversion"):
        assert 0 <= entry[row]["fidelity"] <= 1 and 0 <= entry[row]["alignment"] <= 1 and entry[row]["n"] == 4
        assert sum(entry[row]["rejected"].values()) == round((1 - entry[row]["fidelity"]) * 4 * 2 ** (row != "base"))
    assert 0 <= entry["perfusion"]["leak"] <= 1 and "leak" not in entry["textual_inversion"]
    assert set(entry["beta_sweep"]) == {str(b) for b in quality.BETAS}
    # two training seeds: each seed's figures kept, the row is their mean, each trained into its own folder
    for row in ("perfusion", "textual_inversion"):
        by_seed = entry[row]["by_training_seed"]
        assert len(by_seed) == 2 and entry[row]["training_seeds"] == 2
        assert entry[row]["fidelity"] == pytest.approx((by_seed[0]["fidelity"] + by_seed[1]["fidelity"]) / 2)
        assert (tmp_path / "work" / f"house-{row}").is_dir() and (tmp_path / "work" / f"house-{row}-seed1").is_dir()

    # A resumed run keeps the measured concept instead of training it again; other settings are refused.
    assert quality.main(run + ["--resume"]) == 0
    assert json.loads(out.read_text())["concepts"] == report["concepts"]
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(run + ["--seed", "1", "--resume"])


@pytest.mark.parametrize("method", ["custom_diffusion", "dreambooth"])
def test_weight_baselines_train_in_place_and_restore_the_unet(method, tmp_path):
    import torch

    from benchmarks.baselines import trained_weights
    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.toy.concepts import write_training_set
    from perfusion_ext.toy.plugin import tiny_random_pipeline
    from perfusion_ext.training import TrainConfig

    pipe = tiny_random_pipeline()
    backend = DiffusersBackend(pipe)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    images = write_training_set("house", tmp_path / "house", n=4)
    config = TrainConfig("house", "square", steps=2, batch_size=2, preview_every=0)
    with trained_weights(pipe, backend, method, config, images, images / "masks") as trainer:
        changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all(("attn2.to_k" in k or "attn2.to_v" in k) for k in changed) == (method == "custom_diffusion")
        assert not torch.equal(trainer.embedding["clip_l"], trainer.superclass_embedding["clip_l"])
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())


@pytest.mark.parametrize("layout", ["horizontal", "vertical"])
def test_two_concept_halves_keep_one_concept_each(layout):
    """Two concepts drawn in their halves of one image: each half is judged as its own concept alone."""
    import numpy as np

    from perfusion_ext.toy import pairs
    from perfusion_ext.toy.concepts import fidelity
    from perfusion_ext.toy.two_named import halves

    a, b, _ = next(p for p in quality.TWO_CONCEPT_PAIRS if p[2] == layout)
    places = ("left", "right") if layout == "horizontal" else ("top", "bottom")
    background = next(c for c in CONCEPTS[a].readable_backgrounds() if c in CONCEPTS[b].readable_backgrounds())
    image = pairs.render(CONCEPTS[a].composite.scene(places[0], background))
    second = pairs.render(CONCEPTS[b].composite.scene(places[1], background))
    drawn = (second != image[0, 0]).any(-1)
    image[drawn] = second[drawn]
    assert not fidelity(image, a).is_concept  # four parts: the whole image is neither concept
    first_half, second_half = halves(image, layout)
    assert fidelity(first_half, a).is_concept and fidelity(second_half, b).is_concept
    assert not np.array_equal(first_half, second_half)


def test_rows_that_train_like_the_default_are_recognised():
    """always_flip trains a mirrorable concept exactly as the default does: the benchmark reuses that row."""
    mirrorable = next(c for c in CONCEPTS.values() if c.mirrorable and c.in_range)
    fixed = next(c for c in CONCEPTS.values() if not c.mirrorable and c.in_range)
    assert quality.training_changes("always_flip", mirrorable) == quality.training_changes("perfusion", mirrorable)
    assert quality.training_changes("always_flip", fixed) != quality.training_changes("perfusion", fixed)
    assert quality.training_changes("perfusion", fixed) == {"flip": False}


def test_reports_of_a_split_run_merge_into_one():
    def report(names, pair):
        concepts = {n: {"in_range": True, "base": {"fidelity": 0.0, "alignment": 0.8},
                        "perfusion": {"fidelity": f, "alignment": 1.0, "leak": 0.02}} for n, f in names.items()}
        return {"settings": {"seeds": 4}, "concepts": concepts, "seconds": 10.0, "machine": "m", "complete": True,
                "two_concepts": {"perfusion": {pair: {n: {"fidelity_alone": 0.5} for n in names}}}}

    merged = quality.merge_reports([report({"house": 0.4, "lollipop": 0.2}, "house+lollipop"),
                                    report({"signpost": 0.6, "duotone": 0.2}, "signpost+duotone")])
    assert set(merged["concepts"]) == {"house", "lollipop", "signpost", "duotone"} and merged["rows"] == ["perfusion"]
    assert set(merged["two_concepts"]["perfusion"]) == {"house+lollipop", "signpost+duotone"}
    assert merged["summary"]["in_range"]["perfusion"]["fidelity"] == pytest.approx(0.35)
    assert merged["seconds"] == 20.0 and merged["complete"]
    with pytest.raises(SystemExit, match="more than one report"):
        quality.merge_reports([report({"house": 0.4}, "x"), report({"house": 0.5}, "y")])
    other = report({"ring": 0.1}, "z")
    other["settings"] = {"seeds": 1}
    with pytest.raises(SystemExit, match="different settings"):
        quality.merge_reports([report({"house": 0.4}, "x"), other])


def test_runs_split_by_rows_merge_into_one():
    def report(row, fidelity, base=0.0, two=None):
        entry = {"in_range": True, "base": {"fidelity": base, "alignment": 0.8},
                 row: {"fidelity": fidelity, "alignment": 1.0, "leak": 0.02}}
        return {"settings": {"seeds": 4}, "concepts": {"house": entry}, "seconds": 5.0, "machine": "m",
                "complete": True, "two_concepts": {"base_superclass_words": {"house+lollipop": two or {"house": 1}},
                                                   row: {"house+lollipop": {"house": fidelity}}}}

    merged = quality.merge_reports([report("perfusion", 0.6), report("leading_object_0.3", 0.5)])
    house = merged["concepts"]["house"]
    assert house["perfusion"]["fidelity"] == 0.6 and house["leading_object_0.3"]["fidelity"] == 0.5
    assert merged["rows"] == ["perfusion", "leading_object_0.3"] and "kept_from_earlier_run" not in merged
    assert set(merged["two_concepts"]) == {"base_superclass_words", "perfusion", "leading_object_0.3"}
    with pytest.raises(SystemExit, match="house's base differ"):
        quality.merge_reports([report("perfusion", 0.6), report("leading_object_0.3", 0.5, base=0.1)])
    with pytest.raises(SystemExit, match="row\\(s\\) \\['perfusion'\\] of house"):
        quality.merge_reports([report("perfusion", 0.6), report("perfusion", 0.5)])
    with pytest.raises(SystemExit, match="base_superclass_words"):
        quality.merge_reports([report("perfusion", 0.6), report("leading_object_0.3", 0.5, two={"house": 0})])


def test_a_rerun_of_some_rows_keeps_the_others_from_the_earlier_report():
    def entry(rows):
        return {"in_range": True, "base": {"fidelity": 0.0, "alignment": 0.8},
                **{row: {"fidelity": f, "alignment": 1.0, "leak": 0.02} for row, f in rows.items()}}

    earlier = {"settings": {"seeds": 4}, "complete": True, "seconds": 99.0, "machine": "m",
               "concepts": {"house": entry({"perfusion": 0.3, "textual_inversion": 0.1})},
               "two_concepts": {"perfusion": {"house+lollipop": {}}, "textual_inversion": {"house+lollipop": {}}}}
    rerun = {"settings": {"seeds": 4}, "complete": True, "seconds": 10.0, "machine": "m",
             "concepts": {"house": entry({"perfusion": 0.5})}, "two_concepts": {"perfusion": {"house+lollipop": {"x": 1}}}}
    merged = quality.merge_reports([rerun], earlier)
    house = merged["concepts"]["house"]
    assert house["perfusion"]["fidelity"] == 0.5 and house["textual_inversion"]["fidelity"] == 0.1
    assert merged["rows"] == ["perfusion", "textual_inversion"]
    assert merged["kept_from_earlier_run"] == {"rows": {"house": ["textual_inversion"]},
                                               "two_concepts": {"textual_inversion": ["house+lollipop"]}}
    assert merged["two_concepts"]["perfusion"]["house+lollipop"] == {"x": 1}
    assert "kept_from_earlier_run" not in quality.merge_reports([rerun])
    with pytest.raises(SystemExit, match="incomplete"):
        quality.merge_reports([rerun], {**earlier, "complete": False})
    with pytest.raises(SystemExit, match="not rerun"):
        quality.merge_reports([rerun], {**earlier, "concepts": {**earlier["concepts"], "duotone": entry({})}})
    with pytest.raises(SystemExit, match="different settings"):
        quality.merge_reports([rerun], {**earlier, "settings": {"seeds": 1}})


def test_training_seeds_must_be_positive(tmp_path):
    with pytest.raises(SystemExit):
        quality.main(["--training-seeds", "0", "--out", str(tmp_path / "q.json")])


def test_controls_are_averaged_apart_from_the_concepts():
    def entry(fidelity, in_range=True, control=False):
        return {"in_range": in_range, "control": control, "base": {"fidelity": 0.0, "alignment": 1.0},
                "perfusion": {"fidelity": fidelity, "alignment": 0.9, "leak": 0.01}}

    results = {"house": entry(0.4), "lollipop": entry(0.2), "teddy": entry(0.1, in_range=False),
               "mushroom_control": entry(0.8, control=True)}
    summary = quality.summarise(results, ["perfusion"])
    assert summary["in_range"]["perfusion"]["fidelity"] == pytest.approx(0.3)
    assert summary["out_of_range"]["perfusion"]["fidelity"] == pytest.approx(0.1)
    assert summary["controls"]["perfusion"]["fidelity"] == pytest.approx(0.8)
    del results["mushroom_control"]
    assert set(quality.summarise(results, ["perfusion"])) == {"in_range", "out_of_range"}


def test_figures_over_training_seeds_are_means():
    one = {"fidelity": 0.5, "alignment": 1.0, "n": 168, "train_seconds": 60.0}
    assert quality.mean_figures([one]) == one
    two = quality.mean_figures([one, {"fidelity": 0.25, "alignment": 0.5, "n": 168, "train_seconds": 70.0}])
    assert two == {"fidelity": 0.375, "alignment": 0.75, "train_seconds": 65.0, "n": 168, "training_seeds": 2}


def test_the_judges_reasons_are_summed_over_training_seeds():
    seeds = [{"fidelity": 0.5, "n": 4, "rejected": {"shapes": 2}},
             {"fidelity": 0.25, "n": 4, "rejected": {"shapes": 1, "colours": 2}}]
    assert quality.mean_figures(seeds)["rejected"] == {"shapes": 3, "colours": 2}


def test_measure_counts_why_the_judge_rejected_images(monkeypatch):
    from PIL import Image

    from perfusion_ext.pipelines import generate as generate_module
    from perfusion_ext.toy.concepts import render_concept

    scenes = [render_concept("house", "left", "blue")[0], np.full((32, 32, 3), 255, np.uint8)]
    monkeypatch.setattr(generate_module, "generate",
                        lambda pipe, text, concepts_dir=None, seed=0, n=1: ([Image.fromarray(s) for s in scenes], []))
    out = quality.measure(None, [("a {} on the left, blue background", "blue", "left")], "rocket", "house", 2)
    assert out["fidelity"] == 0.5 and out["n"] == 2
    assert out["rejected"] == {"0 parts": 1}
