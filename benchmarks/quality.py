"""Quality benchmark on the toy world: does a trained concept look like its subject while the prompt is obeyed?

    python -m benchmarks.quality [--concepts house lollipop …] [--rows perfusion paper_recipe …]
                                 [--seeds 4] [--training-seeds 1] [--steps N] [--quick] [--update-readme]

On a machine with two or more cores, run one process per two-concept pair, then merge (about half the time):

    OMP_NUM_THREADS=1 python -m benchmarks.quality --concepts house lollipop --out a.json --work w &
    OMP_NUM_THREADS=1 python -m benchmarks.quality --concepts signpost duotone --out b.json --work w
    python -m benchmarks.quality --merge a.json b.json --update-readme
    python -m benchmarks.quality --merge a.json b.json --keep-from old.json   # runs of some --rows only

For each toy concept (in range: composites the base model can draw but no word names; out of range:
sprites it cannot render) it measures two ceilings — the training images round-tripped through the VAE
and judged, and the base model given the concept spelled out ("a red triangle on top of a white square
…") — then trains every row and generates on ≥ 30 unseen prompts (backgrounds and positions the training
images never showed; size words, background-first phrasings, style prefixes) × seeds:

- fidelity: share of images the strict judge (toy.concepts.fidelity) recognises as the concept;
- alignment: share whose background and position both match the prompt;
- leak: the concept's mean gate on tokens that are not its own (Perfusion rows), from the gate inspector;
- the base model with the superclass word on the same prompts: its alignment, and the judge's false
  positives on its images.

Rows: our recipe; the paper's recipe; each of our fixes removed alone; options off by default (background
distillation, embedding pull, context gate, leading-object captions at 0.3); textual inversion (its own budget,
applied at strength 0 so only the learned word acts); Perfusion without key locking; Custom Diffusion and
DreamBooth with prior preservation (ceilings). A β sweep for our recipe, and two concepts in one prompt
("<a> on the left, <b> on the right", or top and bottom). Results: benchmarks/results/quality.json, docs/quality_tradeoff.png,
and with --update-readme the README table.

Controls (`--concepts mushroom_control rocket_control`, never by default): objects the base model already
draws from a word of their own, learned like the concepts under another named word; averaged apart from the
concepts, with a fourth ceiling, the base model given the object's own word. They say whether a concept's
fidelity is limited by the recipe or by what the base model can render.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, markdown_table, scatter, splice_readme

from perfusion_ext.training.config import PAPER_RECIPE

# Row name -> TrainConfig changes. "flip" is set per concept (its mirror flag) unless a row sets it.
ROWS: dict[str, dict] = {
    "perfusion": {},
    "paper_recipe": {**PAPER_RECIPE, "varied_captions": False},
    "no_varied_captions": {"varied_captions": False},
    "no_caption_init": {"init_from_captions": False},
    "with_background_distill": {"background_distill": 1.0},
    "with_embedding_pull": {"embedding_pull": 1.0},
    "no_leak_penalty": {"leak_penalty": 0.0},
    "no_phrasing_gate": {"phrasing_gate": 0.0},
    "value_lr_0.03": {"lr_value": 0.03},
    "with_context_gate": {"context_gate": 1.0},
    "always_flip": {"flip": True},
    "leading_object_0.3": {"leading_object": 0.3},
    "pair_scenes_6": {"pair_scenes": 6},
    "paper_train_gate": {"train_beta": PAPER_RECIPE["train_beta"], "train_tau": PAPER_RECIPE["train_tau"]},
    "textual_inversion": {"mode": "textual_inversion", "steps_factor": 2, "lr_embedding": 0.02},
    "no_key_lock": {"mode": "no_key_lock"},
    "custom_diffusion": {"baseline": "custom_diffusion"},
    "dreambooth": {"baseline": "dreambooth"},
}
DEFAULT_ROWS = tuple(ROWS)
BETAS = (0.5, 0.6, 0.7, 0.8, 0.9)
# Two concepts in one 32 px image only fit side by side when both are narrow (the upright composites, 11 px
# wide) and one above the other when both are flat (the horizontal ones, ≤ 11 px tall).
TWO_CONCEPT_PAIRS = (("house", "lollipop", "horizontal"), ("signpost", "duotone", "vertical"))


@dataclasses.dataclass(frozen=True)
class TwoConceptRow:
    """A row measured with two concepts in one prompt (where both concepts have the trained `row`): the tag
    options of both tags, those of the second only, competitive gates, clause-wise encoding."""

    label: str
    row: str
    option: str = ""
    competitive: bool = False
    second_option: str = ""
    clause_encoding: bool = False


TWO_CONCEPT_ROWS = (TwoConceptRow("perfusion", "perfusion"),
                    TwoConceptRow("perfusion_competitive_gates", "perfusion", competitive=True),
                    TwoConceptRow("leading_object_0.3_competitive_gates", "leading_object_0.3", competitive=True),
                    TwoConceptRow("pair_scenes_6_competitive_gates", "pair_scenes_6", competitive=True),
                    TwoConceptRow("pair_scenes_6_clauses_second_beta_0.5", "pair_scenes_6", competitive=True,
                                  second_option=":beta=0.5", clause_encoding=True),
                    TwoConceptRow("no_leak_penalty", "no_leak_penalty"),
                    TwoConceptRow("with_context_gate", "with_context_gate"),
                    TwoConceptRow("textual_inversion", "textual_inversion", option=":0"))
# the two-concept table's rows: the methods, then the base model's ceilings
TWO_CONCEPT_ORDER = tuple(r.label for r in TWO_CONCEPT_ROWS) + ("base_spelled_out", "base_superclass_words")
TWO_CONCEPT_TEMPLATES = {
    "horizontal": ("a {a} on the left, a {b} on the right, {bg} background",
                   "{bg} background, {a} at the left and {b} at the right"),
    "vertical": ("a {a} at the top, a {b} at the bottom, {bg} background",
                 "{bg} background, {a} on top and {b} on the bottom"),
}
COLOURS = {"perfusion": (20, 60, 200), "paper_recipe": (120, 60, 200), "textual_inversion": (200, 80, 20),
           "no_key_lock": (30, 150, 60), "custom_diffusion": (180, 40, 120), "dreambooth": (120, 120, 20),
           "base": (90, 90, 90)}
STYLE = ("sketch", "digital art")


def unseen_prompts(name: str, minimum: int = 30) -> list[tuple[str, str, str]]:
    """(prompt template with {} for the subject, background, position): every readable background ×
    position pair the training images never showed, phrased in turn with size words, background first
    and a style prefix; repeated with other phrasings until there are at least `minimum`."""
    from perfusion_ext.toy.concepts import get_concept, training_scenes
    from perfusion_ext.toy.world import POSITION_PHRASES, POSITIONS

    seen = {(s["background"], s["position"]) for s in training_scenes(name)}
    pairs = [(bg, pos) for bg in get_concept(name).readable_backgrounds() for pos in POSITIONS if (bg, pos) not in seen]
    phrasings = (
        "a photo of a {{}} {pos}, {bg} background",
        "{bg} background, a small {{}} {pos}",
        "{style}, a {{}} {pos} on a {bg} background",
        "a large {{}} {pos} on a plain {bg} background",
    )
    out, round_ = [], 0
    while len(out) < minimum or round_ == 0:
        for i, (bg, pos) in enumerate(pairs):
            phrase = POSITION_PHRASES[pos][(i + round_) % len(POSITION_PHRASES[pos])]
            template = phrasings[(i + round_) % len(phrasings)]
            out.append((template.format(pos=phrase, bg=bg, style=STYLE[i % len(STYLE)]), bg, pos))
        round_ += 1
    return out


def measure(pipe, prompts, subject: str, name: str, seeds: int, concepts_dir=None, beta=None, strength=None,
            judge=None) -> dict:
    """Fidelity (the concept's judge, or `judge`: image -> Fidelity) with the judge's reasons for the images it
    rejected, alignment (background and position), and for a tag the mean gate on other tokens."""
    from perfusion_ext.pipelines.generate import generate
    from perfusion_ext.pipelines.inspect import inspect_prompt, mean_leak
    from perfusion_ext.toy.checkers import read_alignment
    from perfusion_ext.toy.concepts import fidelity

    options = "".join(f":{k}={v}" for k, v in (("beta", beta),) if v is not None)
    if strength is not None:
        options = f":{strength}" + options
    tagged = subject.replace(">", f"{options}>") if subject.startswith("<") else subject
    judge = judge or (lambda image: fidelity(image, name))
    fid = align = bg_ok = pos_ok = n = 0
    leaks, rejected = [], collections.Counter()
    for template, bg, pos in prompts:
        text = template.format(tagged)
        images, _ = generate(pipe, text, concepts_dir=concepts_dir, seed=0, n=seeds)
        for image in images:
            image = np.asarray(image)
            background, position = read_alignment(image)
            verdict = judge(image)
            fid += verdict.is_concept
            rejected[verdict.reason] += not verdict.is_concept
            bg_ok += background == bg
            pos_ok += position == pos
            align += background == bg and position == pos
            n += 1
        if concepts_dir is not None and strength != 0:
            leaks.append(mean_leak(inspect_prompt(pipe, text, concepts_dir), name))
    out = {"fidelity": fid / n, "alignment": align / n, "background": bg_ok / n, "position": pos_ok / n, "n": n,
           "rejected": {reason: count for reason, count in rejected.most_common() if count}}
    if leaks:
        out["leak"] = float(np.mean(leaks))
    return out


def ceilings(pipe, name: str, images_dir: Path, seeds: int, prompts) -> dict:
    """VAE round trip of the training images (judged); the base model given the spelled-out concept; and the
    base model given the superclass word, judged as the two-part object that word names, on the prompts whose
    background it can be seen on: how often this model draws a composite it *has* a word for (trained on it
    for tens of thousands of steps) on these prompts, the most a new word can hope for. A control has a fourth:
    the base model given the object's own word, judged as the control."""
    from PIL import Image

    from perfusion_ext.toy.concepts import composite_fidelity, fidelity, get_concept
    from perfusion_ext.toy.named import MIRRORABLE, NAMED
    from perfusion_ext.toy.named import backgrounds as named_backgrounds

    vae = pipe.vae
    hits = []
    for png in sorted(images_dir.glob("*.png")):
        pixels = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"), np.float32))
        x = (pixels.permute(2, 0, 1)[None] / 127.5 - 1).to(vae.dtype)
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
        image = ((recon.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        hits.append(fidelity(image, name).is_concept)
    out = {"vae_round_trip": float(np.mean(hits))}
    concept = get_concept(name)
    if concept.in_range:
        out["spelled_out"] = measure(pipe, prompts, concept.composite.description(), name, seeds)
    if concept.known_as:
        out["known_word"] = measure(pipe, prompts, concept.known_as, name, seeds)
    word = concept.superclass
    if word in NAMED:
        readable = [p for p in prompts if p[1] in named_backgrounds(word)]
        out["superclass_word"] = measure(
            pipe, readable, word, name, seeds,
            judge=lambda image: composite_fidelity(image, NAMED[word], word in MIRRORABLE))
    return out


def training_changes(row: str, concept) -> dict:
    """The TrainConfig changes a row makes for this concept (its flip default included)."""
    return {**ROWS[row], "flip": ROWS[row].get("flip", concept.mirrorable)}


def train_row(pipe, backend, row: str, name: str, work: Path, steps: int | None, seed: int,
              folder_name: str | None = None) -> tuple[Path, float]:
    """Train one row's concept into work/`folder_name` (default NAME-ROW); returns (concepts folder, seconds)."""
    from perfusion_ext.toy.concepts import get_concept, write_training_set
    from perfusion_ext.training import TrainConfig, train

    concept = get_concept(name)
    changes = training_changes(row, concept)
    images = write_training_set(name, work / f"{name}-{row}-images", n=6, varied_captions=changes.pop("varied_captions", True))
    factor = changes.pop("steps_factor", 1)
    changes.pop("baseline", None)
    config = TrainConfig(name, concept.superclass, steps=steps, preview_every=0, seed=seed,
                         masks_dir=str(images / "masks"), **changes)
    config = config.resolved(backend.family, backend.device)
    config = dataclasses.replace(config, steps=config.steps * factor)
    folder = work / (folder_name or f"{name}-{row}")
    started = time.time()
    train(backend, config, images, folder, overwrite=True)
    return folder, time.time() - started


def run_concept(pipe, backend, name: str, rows, seeds: int, steps, work: Path, seed: int,
                max_prompts: int | None = None, training_seeds: int = 1) -> dict:
    from perfusion_ext.toy.concepts import CONTROLS, get_concept, write_training_set

    concept = get_concept(name)
    prompts = unseen_prompts(name)[:max_prompts]
    entry = {"superclass": concept.superclass, "in_range": concept.in_range, "mirrorable": concept.mirrorable,
             "control": name in CONTROLS,
             "prompts": [t for t, _, _ in prompts],
             "ceilings": ceilings(pipe, name, write_training_set(name, work / f"{name}-ceiling"), seeds, prompts),
             "base": measure(pipe, prompts, concept.superclass, name, seeds)}
    print(name, "ceilings", entry["ceilings"], "base", entry["base"], flush=True)
    default = training_changes("perfusion", concept)
    for row in rows:
        if row != "perfusion" and "perfusion" in entry and training_changes(row, concept) == default:
            # e.g. always_flip of a mirrorable concept: training is deterministic, so retraining would repeat the row
            entry[row] = {**entry["perfusion"], "same_training_as": "perfusion"}
            print(name, row, "= perfusion (the same training)", flush=True)
            continue
        # Training seeds seed, seed+1, …: one run of one concept moves by up to 30 points with the seed alone.
        runs = [measure_row(pipe, backend, row, name, work, steps, seed + k, seeds, prompts, k > 0)
                for k in range(training_seeds)]
        entry[row] = mean_figures([result for result, _ in runs])
        if training_seeds > 1:
            entry[row]["by_training_seed"] = [result for result, _ in runs]
        if row == "perfusion":
            entry["beta_sweep"] = {str(b): mean_figures([sweep[str(b)] for _, sweep in runs]) for b in BETAS}
        print(name, row, entry[row], flush=True)
    return entry


def measure_row(pipe, backend, row: str, name: str, work: Path, steps, seed: int, seeds: int, prompts,
                replicate: bool) -> tuple[dict, dict | None]:
    """Train one row with one training seed and measure it; (figures with train_seconds, β sweep of the
    perfusion row or None). A replicate trains into its own folder: the first seed's serves the two-concept
    prompts."""
    from baselines import trained_weights

    from perfusion_ext.core.concept import save_concept
    from perfusion_ext.toy.concepts import get_concept, write_training_set
    from perfusion_ext.training import TrainConfig

    concept, tag = get_concept(name), f"<perfusion:{name}>"
    folder_name = f"{name}-{row}" + (f"-seed{seed}" if replicate else "")
    baseline = ROWS[row].get("baseline")
    sweep = None
    started = time.time()
    if baseline:
        images = write_training_set(name, work / f"{name}-{row}-images")
        config = TrainConfig(name, concept.superclass, steps=steps, preview_every=0, seed=seed,
                             flip=concept.mirrorable)
        with trained_weights(pipe, backend, baseline, config, images, images / "masks") as trainer:
            folder = work / folder_name
            folder.mkdir(parents=True, exist_ok=True)
            save_concept(trainer.concept(), folder / f"{name}.safetensors")
            seconds = time.time() - started
            result = measure(pipe, prompts, tag, name, seeds, folder, strength=0)
    else:
        folder, seconds = train_row(pipe, backend, row, name, work, steps, seed, folder_name)
        strength = 0 if ROWS[row].get("mode") == "textual_inversion" else None
        result = measure(pipe, prompts, tag, name, seeds, folder, strength=strength)
        if row == "perfusion":
            sweep = {str(b): measure(pipe, prompts, tag, name, seeds, folder, beta=b) for b in BETAS}
    result["train_seconds"] = round(seconds, 1)
    return result, sweep


def mean_figures(results: list[dict]) -> dict:
    """The mean of each figure over training seeds (n stays the images per seed; the judge's reasons are summed
    over every seed's images); one result is itself."""
    if len(results) == 1:
        return dict(results[0])
    out = {key: float(np.mean([r[key] for r in results])) for key in results[0] if key not in ("n", "rejected")}
    out["n"], out["training_seeds"] = results[0]["n"], len(results)
    if "rejected" in results[0]:
        out["rejected"] = dict(sum((collections.Counter(r["rejected"]) for r in results), collections.Counter()))
    return out


def two_concepts(pipe, results: dict, work: Path, seeds: int) -> dict:
    """"<a> on the left, <b> on the right" (or top and bottom): each concept judged in its half, against its
    fidelity alone; for our recipe (with plain and with competitive gates, and without the leak penalty), for
    leading-object captions (with competitive gates: they exist to make the second concept drawable) and,
    beside it, two textual inversions in one prompt (their words alone: strength 0). Two ceilings on the same prompts: the base
    model given both concepts spelled out, and given the two superclass words (each half judged as its
    named object: can the base model draw two named objects in this layout at all?)."""
    from perfusion_ext.toy import world
    from perfusion_ext.toy.concepts import CONCEPTS, composite_fidelity, fidelity
    from perfusion_ext.toy.named import MIRRORABLE, NAMED
    from perfusion_ext.toy.named import backgrounds as named_backgrounds

    out = {}
    for a, b, layout in TWO_CONCEPT_PAIRS:
        if not all(n in results for n in (a, b)):
            continue
        backgrounds = [c for c in CONCEPTS[a].readable_backgrounds() if c in CONCEPTS[b].readable_backgrounds()]
        judges = {n: (lambda image, n=n: fidelity(image, n).is_concept) for n in (a, b)}
        for spec in TWO_CONCEPT_ROWS:
            if not all(spec.row in results[n] for n in (a, b)):
                continue
            folder = work / f"two-{spec.row}-{a}-{b}"
            folder.mkdir(exist_ok=True)
            for n in (a, b):
                (folder / f"{n}.safetensors").write_bytes((work / f"{n}-{spec.row}" / f"{n}.safetensors").read_bytes())
            subjects = {a: f"<perfusion:{a}{spec.option}>", b: f"<perfusion:{b}{spec.option}{spec.second_option}>"}
            alone = {n: results[n][spec.row]["fidelity"] for n in (a, b)}
            out.setdefault(spec.label, {})[f"{a}+{b}"] = two_subject_fidelity(
                pipe, layout, backgrounds, subjects, judges, alone, seeds, folder, spec.competitive,
                spec.clause_encoding)
        spelled = {n: CONCEPTS[n].composite.description() for n in (a, b)}
        alone = {n: results[n]["ceilings"]["spelled_out"]["fidelity"] for n in (a, b)}
        out.setdefault("base_spelled_out", {})[f"{a}+{b}"] = two_subject_fidelity(
            pipe, layout, backgrounds, spelled, judges, alone, seeds)
        words = {n: CONCEPTS[n].superclass for n in (a, b)}
        word_judges = {n: (lambda image, w=words[n]: composite_fidelity(image, NAMED[w], w in MIRRORABLE).is_concept)
                       for n in (a, b)}
        # the superclass objects' own colours differ from the concepts': their readable backgrounds too
        drawable = [c for c in world.COLOURS if all(c in named_backgrounds(w) for w in words.values())]
        out.setdefault("base_superclass_words", {})[f"{a}+{b}"] = two_subject_fidelity(
            pipe, layout, drawable, words, word_judges, {a: None, b: None}, seeds)
    for row, by_pair in out.items():
        print("two concepts", row, by_pair, flush=True)
    return out


def two_subject_fidelity(pipe, layout: str, backgrounds, subjects: dict, judges: dict, alone: dict, seeds: int,
                         concepts_dir: Path | None = None, competitive: bool = False,
                         clause_encoding: bool = False) -> dict:
    """Each subject's share of images judged right in its own half, beside its fidelity alone."""
    from perfusion_ext.pipelines.generate import generate
    from perfusion_ext.toy.two_named import halves

    a, b = subjects
    hits, total = {a: 0, b: 0}, 0
    for bg in backgrounds:
        for template in TWO_CONCEPT_TEMPLATES[layout]:
            images, _ = generate(pipe, template.format(a=subjects[a], b=subjects[b], bg=bg), concepts_dir=concepts_dir,
                                 n=seeds, competitive_gates=competitive, clause_encoding=clause_encoding)
            for image in images:
                for name, half in zip((a, b), halves(np.asarray(image), layout)):
                    hits[name] += judges[name](half)
                total += 1
    return {n: {"fidelity_together": hits[n] / total, "fidelity_alone": alone[n], "n": total} for n in (a, b)}


def summarise(results: dict, rows) -> dict:
    """Means over the in-range concepts, the out-of-range ones and (where measured) the controls, apart."""
    def group_of(entry):
        return "controls" if entry.get("control") else "in_range" if entry["in_range"] else "out_of_range"

    def mean(group, key, metric):
        values = [c[key][metric] for c in results.values() if group_of(c) == group and key in c and metric in c[key]]
        return float(np.mean(values)) if values else None

    groups = ("in_range", "out_of_range") + (("controls",) if any(c.get("control") for c in results.values()) else ())
    return {group: {key: {m: mean(group, key, m) for m in ("fidelity", "alignment", "leak")}
                    for key in ("base",) + tuple(rows)}
            for group in groups}


def previous_report(out: Path, settings: dict) -> dict | None:
    """The report in `out` if an earlier run with the same settings wrote it (its concepts are kept)."""
    if not out.exists():
        return None
    report = json.loads(out.read_text())
    if report.get("settings") != settings:
        raise SystemExit(f"{out} was written with other settings ({report.get('settings')}); "
                         f"run without --resume or with those settings")
    report["complete"] = False
    return report


def merge_reports(reports: list[dict], earlier: dict | None = None) -> dict:
    """One report from runs split by concept or by rows: the same settings, no row of a concept twice,
    two-concept rows joined. Runs split by rows measure a concept's ceilings and base model again: being
    deterministic, those must agree, or the runs came from different code or base models.

    With `earlier` (a complete report of the same settings), a rerun of only the rows a change touches becomes
    a whole report: every row and two-concept row the runs did not measure is taken from `earlier` and listed
    under "kept_from_earlier_run", so the table says which figures are older."""
    settings = reports[0]["settings"]
    if any(r["settings"] != settings for r in reports + ([earlier] if earlier else [])):
        raise SystemExit("the reports were written with different settings; merge only runs of one configuration")
    concepts, two = {}, {}
    for r in reports:
        for name, entry in r["concepts"].items():
            concepts[name] = join_rows(name, concepts[name], entry) if name in concepts else entry
        for row, by_pair in r.get("two_concepts", {}).items():
            for pair, figures in by_pair.items():
                if two.get(row, {}).get(pair, figures) != figures:
                    raise SystemExit(f"two-concept row {row} ({pair}) differs between the reports; merge only runs "
                                     f"of one code and base model")
                two.setdefault(row, {})[pair] = figures
    kept = keep_unmeasured_rows(concepts, two, earlier) if earlier else {}
    rows = [r for r in ROWS if any(r in entry for entry in concepts.values())]
    report = {"settings": settings, "concepts": concepts, "seconds": round(sum(r["seconds"] for r in reports), 1),
              "machine": reports[0]["machine"], "rows": rows, "two_concepts": two,
              "summary": summarise(concepts, rows), "complete": all(r.get("complete") for r in reports),
              "merged_from": len(reports)}
    if kept:
        report["kept_from_earlier_run"] = kept
    return report


def join_rows(name: str, entry: dict, other: dict) -> dict:
    """One concept's entry from two runs of other rows; everything that is not a row must be the same."""
    both = set(entry) & set(other)
    if both & set(ROWS):
        raise SystemExit(f"row(s) {sorted(both & set(ROWS))} of {name} are in more than one report")
    differing = sorted(key for key in both if entry[key] != other[key])
    if differing:
        raise SystemExit(f"{name}'s {', '.join(differing)} differ between the reports; merge only runs of one code "
                         f"and base model")
    return {**entry, **other}


def keep_unmeasured_rows(concepts: dict, two: dict, earlier: dict) -> dict:
    """Copy into `concepts` and `two` (in place) the rows of `earlier` they lack; returns what was copied:
    {"rows": {concept: [row, …]}, "two_concepts": {row: [pair, …]}}."""
    if not earlier.get("complete"):
        raise SystemExit("the earlier report is incomplete; keep rows only from a finished run")
    missing = sorted(set(earlier["concepts"]) - set(concepts))
    if missing:
        raise SystemExit(f"concept(s) {missing} of the earlier report were not rerun; rerun them or merge without it")
    kept = {"rows": {}, "two_concepts": {}}
    for name, entry in concepts.items():
        old = earlier["concepts"].get(name, {})
        rows = [row for row in ROWS if row in old and row not in entry]
        entry.update({row: old[row] for row in rows})
        if rows:
            kept["rows"][name] = rows
    for row, by_pair in earlier.get("two_concepts", {}).items():
        pairs = [pair for pair in by_pair if pair not in two.get(row, {})]
        two.setdefault(row, {}).update({pair: by_pair[pair] for pair in pairs})
        if pairs:
            kept["two_concepts"][row] = pairs
    return {part: by for part, by in kept.items() if by}


def write_report(out: Path, report: dict) -> None:
    """Write the report so far (atomically: a killed run leaves the last complete concept)."""
    from perfusion_ext.core.atomic import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report, out)


def main(argv=None) -> int:
    from perfusion_ext.toy.concepts import CONCEPTS, CONTROLS, IN_RANGE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS) + list(CONTROLS),
                   help="the concepts to measure (default: all); the controls, objects the base model already "
                        "names learned as concepts under another word, only when named here")
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (one seed each)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the toy family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--training-seeds", type=int, default=1,
                   help="train every row with this many seeds (--seed, --seed+1, …) and report the means, each "
                        "seed's figures beside them")
    p.add_argument("--model", default="toy", help="toy (default) or a diffusers folder of the toy architecture")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N unseen prompts per concept")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one concept, two rows, one seed, 4 steps, 4 prompts")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    p.add_argument("--work", default=None,
                   help="folder for training images and trained concepts (default: a new temporary folder)")
    p.add_argument("--resume", action="store_true",
                   help="keep the concepts --out already holds from a run with the same settings and measure only "
                        "the others (every concept is written to --out as soon as it is measured); needs the "
                        "earlier run's --work for the two-concept prompts")
    p.add_argument("--merge", nargs="+", metavar="REPORT",
                   help="combine the reports of runs split by --concepts or by --rows (same settings, each its own "
                        "--out; split by the two-concept pairs to keep those rows) into --out, then plot and, with "
                        "--update-readme, write the README tables")
    p.add_argument("--keep-from", metavar="REPORT",
                   help="with --merge: a complete earlier report of the same settings; the rows and two-concept rows "
                        "the merged runs did not measure (rows a change does not touch) are taken from it and listed "
                        "under kept_from_earlier_run")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    if args.merge:
        earlier = json.loads(Path(args.keep_from).read_text()) if args.keep_from else None
        report = merge_reports([json.loads(Path(f).read_text()) for f in args.merge], earlier)
        write_report(Path(args.out), report)
        publish(report, args.update_readme)
        return 0
    if args.keep_from:
        p.error("--keep-from only goes with --merge")
    if args.training_seeds < 1:
        p.error("--training-seeds must be at least 1")
    if args.resume and not args.work:
        p.error("--resume needs --work, the folder the earlier run trained its concepts in")
    if args.quick:
        args.concepts, args.rows, args.seeds, args.steps = [IN_RANGE[0]], ["perfusion", "textual_inversion"], 1, 4
        args.max_prompts = 4

    from perfusion_ext.pipelines.backend import DiffusersBackend
    from perfusion_ext.pipelines.loading import load_pipeline

    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model)
    backend = DiffusersBackend(pipe)
    started = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="perfusion-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    settings = {"seeds": args.seeds, "steps": args.steps, "seed": args.seed, "model": args.model,
                "max_prompts": args.max_prompts, "betas": list(BETAS)}
    if args.training_seeds > 1:  # absent at 1: reports written before the option stay resumable
        settings["training_seeds"] = args.training_seeds
    report = previous_report(out, settings) if args.resume else None
    report = report or {"settings": settings, "concepts": {}, "seconds": 0.0}
    report["machine"] = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    results, earlier_seconds = report["concepts"], report["seconds"]
    for name in args.concepts:
        if name in results:
            print(name, "kept from", out, flush=True)
            continue
        results[name] = run_concept(pipe, backend, name, args.rows, args.seeds, args.steps, work, args.seed,
                                    args.max_prompts, args.training_seeds)
        report["seconds"] = round(earlier_seconds + time.time() - started, 1)
        write_report(out, report)
    rows = [r for r in ROWS if any(r in entry for entry in results.values())]
    report["rows"] = rows
    measured_together = any(r.row in rows for r in TWO_CONCEPT_ROWS)
    report["two_concepts"] = two_concepts(pipe, results, work, args.seeds) if measured_together else {}
    report["summary"] = summarise(results, rows)
    report["complete"] = True
    report["seconds"] = round(earlier_seconds + time.time() - started, 1)
    write_report(out, report)
    print(json.dumps(report["summary"], indent=2))
    if not args.quick:
        publish(report, args.update_readme)
    return 0


def publish(report: dict, update_readme: bool) -> None:
    """The trade-off plot (docs/quality_tradeoff.png) and, with `update_readme`, the README's two tables."""
    results, rows = report["concepts"], report["rows"]
    in_range = report["summary"]["in_range"]
    # the methods labelled; the recipe ablations as small grey dots around our default
    points = [(v["alignment"], v["fidelity"], k if k in COLOURS else "", COLOURS.get(k, (150, 150, 150)))
              for k, v in in_range.items() if v["fidelity"] is not None]
    sweep = [entry["beta_sweep"] for entry in results.values() if "beta_sweep" in entry and entry["in_range"]]
    points += [(float(np.mean([s[str(b)]["alignment"] for s in sweep])), float(np.mean([s[str(b)]["fidelity"] for s in sweep])),
                f"beta {b}", COLOURS["perfusion"]) for b in BETAS if sweep]
    scatter(points, ROOT / "docs" / "quality_tradeoff.png", "alignment (background and position obeyed)",
            "fidelity (the strict judge recognises the concept; in-range concepts)", x_range=(0.6, 1.0),
            y_range=(0.0, 0.8))
    if not update_readme:
        return

    def cell(v):
        return "—" if v is None else f"{v:.1%}" if v <= 1 else f"{v:.2f}"

    kept = report.get("kept_from_earlier_run", {})
    kept_rows = {row for rows in kept.get("rows", {}).values() for row in rows}

    def label(row, was_kept):
        return f"{row} (earlier run)" if was_kept else row

    table = [[label(k, k in kept_rows)] + [cell(report["summary"][g][k][m]) for g in ("in_range", "out_of_range")
                                           for m in ("fidelity", "alignment", "leak")] for k in ("base",) + tuple(rows)]
    splice_readme("quality", markdown_table(
        ["row", "fidelity (in range)", "alignment", "leak", "fidelity (out of range)", "alignment", "leak"], table))
    pairs = [[label(row, pair in kept.get("two_concepts", {}).get(row, ())), pair, name, cell(v["fidelity_alone"]),
              cell(v["fidelity_together"]),
              "—" if not v["fidelity_alone"] else f"{v['fidelity_together'] / v['fidelity_alone']:.2f}×"]
             for row, by_pair in sorted(report["two_concepts"].items(), key=lambda item: TWO_CONCEPT_ORDER.index(item[0]))
             for pair, names in by_pair.items() for name, v in sorted(names.items(), key=lambda n: pair.index(n[0]))]
    splice_readme("quality-two", markdown_table(
        ["method", "prompt pair", "concept", "fidelity alone", "fidelity together", "together / alone"], pairs))


if __name__ == "__main__":
    raise SystemExit(main())
