"""Fuzzing with hypothesis: mutated concept files, prompts full of broken tags, random REST bodies. Whatever the
input, the only exception is our own clear one (PerfusionError for files, a warning or ValueError for tags,
ApiError for requests), nothing hangs (a deadline per example) and memory stays bounded.

Short in CI; `PERFUSION_FUZZ_EXAMPLES=5000` (examples per test) for a long run, e.g.
    PERFUSION_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/robustness/test_robust_fuzz.py -s
The long run explores new inputs each time; the short one is derandomized so CI is reproducible.
"""
from __future__ import annotations

import json
import os
import struct
import time
from datetime import timedelta

import pytest
from conftest import make_concept, tiny_ldm_unet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robust_helpers import peak_rss_mib, rss_mib

from perfusion_ext.core.concept import load_concept, save_concept, tensor_hash
from perfusion_ext.core.errors import PerfusionError
from perfusion_ext.core.hooks import prepare_edits, resolve
from perfusion_ext.core.tags import parse_prompt, parse_tag_body, rewrite_tags, tag_text
from perfusion_ext.webui import activation
from perfusion_ext.webui.concepts import ConceptStore
from perfusion_ext.webui.train_request import ApiError, parse_train_request

LONG = "PERFUSION_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("PERFUSION_FUZZ_EXAMPLES", "150"))
MEMORY_BUDGET_MIB = 300  # how much the resident memory may grow over one fuzz test
settings.register_profile("perfusion-fuzz", max_examples=EXAMPLES, deadline=timedelta(seconds=3), database=None,
                          derandomize=not LONG, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                 HealthCheck.data_too_large])
FUZZ = settings.get_profile("perfusion-fuzz")
STATS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet()


@pytest.fixture(scope="module")
def good(unet, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz-good") / "teddy.safetensors"
    save_concept(make_concept(unet, "teddy", seed=1), path)
    return path.read_bytes()


@pytest.fixture()
def measured(request):
    """Counts examples, time and memory of one fuzz test; fails when the memory grew past the budget."""
    stats = {"examples": 0, "rss_before_mib": rss_mib(), "started": time.perf_counter()}
    STATS[request.node.name] = stats
    yield stats
    stats["seconds"] = round(time.perf_counter() - stats.pop("started"), 1)
    stats["rss_after_mib"], stats["peak_rss_mib"] = rss_mib(), peak_rss_mib()
    print(f"\n[fuzz] {request.node.name}: {stats}")
    if stats["rss_before_mib"] is not None:
        assert stats["rss_after_mib"] - stats["rss_before_mib"] < MEMORY_BUDGET_MIB, stats


# ---- the concept loader ----------------------------------------------------------------------------------
def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, payload: bytes) -> bytes:
    raw = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + payload


byte_edits = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "overwrite"]), st.integers(0, 1 << 16),
                                st.binary(min_size=1, max_size=16)), min_size=1, max_size=4)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() |
                           st.text(max_size=12), lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
metadata_values = st.text(max_size=24) | st.sampled_from(
    ["1", "2", "", "sd1", "sd2", "sdxl", "toy", "sd9", "nan", "inf", "-1", "0", "1e309", "teddy", "\x00"])


def _mutate_bytes(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, at, blob in edits:
        if not out:
            break
        at %= len(out)
        if kind == "flip":
            out[at] ^= blob[0] or 1
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = blob
        else:
            out[at:at + len(blob)] = blob
    return bytes(out)


@st.composite
def mutated_concepts(draw, good: bytes) -> bytes:
    """A concept file changed at the byte level, in its header's JSON (tensors, dtypes, shapes, offsets) or in
    its metadata, sometimes several ways at once."""
    header, payload = _split(good)
    kind = draw(st.sampled_from(["bytes", "tensor", "metadata", "header"]))
    if kind == "bytes":
        return _mutate_bytes(good, draw(byte_edits))
    if kind == "tensor":
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry = dict(header[name])
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename"]))
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "F32", "F64", "I8", "I64", "U8", "BOOL",
                                                   "F8_E4M3", "F8_E5M2", "C64", "X"]))
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.integers(-3, 2 ** 40), max_size=4))
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-5, 2 ** 62), min_size=0, max_size=3))
        if field == "drop":
            header = {k: v for k, v in header.items() if k != name}
        elif field == "rename":
            header = {draw(st.text(max_size=40)) if k == name else k: v for k, v in header.items()}
        else:
            header = {**header, name: entry}
    elif kind == "metadata":
        meta = dict(header["__metadata__"])
        key = draw(st.sampled_from(sorted(meta)) | st.text(max_size=30))
        if draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = draw(metadata_values)
        header = {**header, "__metadata__": meta}
    else:
        header = {**header, draw(st.text(max_size=20)): draw(json_values)}
        if draw(st.booleans()):
            header["__metadata__"] = draw(json_values)
    data = _join(header, payload)
    return _mutate_bytes(data, draw(byte_edits)) if draw(st.booleans()) else data


def test_fuzz_concept_loader(good, unet, tmp_path, measured):
    folder = tmp_path / "concepts"
    folder.mkdir()
    store = ConceptStore(lambda: folder)
    outcomes = {"loaded": 0, "refused": 0}

    @FUZZ
    @given(data=st.data())
    def run(data):
        blob = data.draw(mutated_concepts(good))
        path = folder / "fuzz.safetensors"
        path.write_bytes(blob)
        os.utime(path, ns=(measured["examples"], measured["examples"]))  # a new file for the store's cache
        measured["examples"] += 1
        try:
            concept = load_concept(path)
        except PerfusionError as exc:
            assert str(exc) and "Traceback" not in str(exc)
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1
            try:  # a file that loads must also be refused or applied cleanly against a model
                prepare_edits(unet, resolve([concept]))
            except PerfusionError:
                pass
        try:
            tensor_hash(path)
        except PerfusionError:
            pass
        entries = store.entries()  # the concept list never raises: a card, broken or not
        assert [e.name for e in entries] == ["fuzz"]
        try:
            store.load("fuzz")
        except PerfusionError:
            pass

    run()
    measured.update(outcomes)
    assert outcomes["refused"] > 0


# ---- the tag parser ---------------------------------------------------------------------------------------
name_part = st.one_of(st.sampled_from(["teddy", "my teddy-2", "a.b", "", "..", "../x", "/etc/passwd", "x" * 101,
                                       "te\x00ddy", "TEDDY", " teddy "]), st.text(max_size=12))
number = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10, 10).map(str),
                   st.floats(0, 1, exclude_max=True).map(repr), st.floats(-10, 10).map(repr),
                   st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-0", "abc", "", " 0.5 ", "0x10", "1_0"]),
                   st.text(max_size=6))
schedule = st.lists(st.tuples(number, st.one_of(st.none(), number)), min_size=1, max_size=4).map(
    lambda points: ",".join(v if at is None else f"{v}@{at}" for v, at in points))
option = st.one_of(number, st.tuples(st.sampled_from(["beta", "tau", "hr_beta", "hr_tau", "w", "strength", "gamma",
                                                      "BETA", ""]), st.one_of(number, schedule)).map("=".join))


@st.composite
def prompts(draw) -> str:
    pieces = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            pieces.append(draw(st.text(max_size=20)))
        else:
            body = ":".join([draw(name_part), *draw(st.lists(option, max_size=5))])
            opener = draw(st.sampled_from(["<perfusion:", "<PERFUSION:", "<perfusion :", "<", "<perfusion:<perfusion:"]))
            closer = draw(st.sampled_from([">", ">", "", ">>", " >"]))
            pieces.append(opener + body + closer)
    return " ".join(pieces)


def test_fuzz_tag_parser(measured):
    @FUZZ
    @given(prompt=prompts() | st.text(max_size=200))
    def run(prompt):
        measured["examples"] += 1
        parsed = parse_prompt(prompt)  # never raises: bad tags are warnings
        for tag in parsed.tags:
            assert abs(tag.strength) <= 100  # finite and bounded (a NaN fails this too)
            for key in ("tau", "hr_tau"):
                assert all(value > 0 for _, value in tag.schedule("tau", hires=key == "hr_tau"))
            again = parse_tag_body(tag_text(tag)[len("<perfusion:"):-1])  # our own text parses back, exactly
            assert (again.name, again.options()) == (tag.name, tag.options())
        rewritten, _ = rewrite_tags(prompt, strength=0.5, beta=0.6, tau=0.2)
        assert len(parse_prompt(rewritten).tags) == len(parsed.tags)
        tags, _ = activation.scan(prompt)  # the WebUI's side of the grammar
        assert [t.name for t in tags] == [t.name for t in parsed.tags]
        activation.collect({"prompt": [prompt], "negative prompt": [prompt]})
        activation.replace_tags(prompt, {t.name: "word" for t in tags})

    run()


# ---- REST bodies --------------------------------------------------------------------------------------------
def test_fuzz_train_request_bodies(tmp_path, measured):
    (tmp_path / "teddy").mkdir()
    keys = st.sampled_from(["name", "superclass", "images", "images_dir", "masks_dir", "resume", "overwrite",
                            "description", "init_from", "steps", "batch_size", "micro_batch", "resolution", "tau",
                            "beta", "seed", "bogus"])
    paths = st.sampled_from(["teddy", "/etc", "../..", "~nouser", "a\x00b", "x" * 300, "data:image/png;base64,AAAA",
                             "A" * 64, ""]) | st.text(max_size=20)

    @FUZZ
    @given(body=st.dictionaries(keys, json_values | paths | st.lists(paths, max_size=3), max_size=8) | json_values)
    def run(body):
        measured["examples"] += 1
        try:
            parse_train_request(body, [tmp_path])
        except ApiError as exc:
            assert 400 <= exc.status < 500 and exc.message

    run()


def test_loader_memory_is_flat_without_hypothesis(good, unet, tmp_path):
    """The fuzz tests' RSS includes hypothesis' own records of every example; this loop has none: 300 mutated files
    through the loader, the store and the hooks' checks, and the resident memory after the first 60 stays put."""
    import random

    store, rng, rss = ConceptStore(lambda: tmp_path), random.Random(0), []
    for i in range(300):
        blob = bytearray(good)
        if i % 2:
            blob[rng.randrange(len(blob))] ^= rng.randrange(1, 256)
        path = tmp_path / "fuzz.safetensors"
        path.write_bytes(bytes(blob))
        os.utime(path, ns=(i, i))
        try:
            prepare_edits(unet, resolve([load_concept(path)]))
        except PerfusionError:
            pass
        store.entries()
        if i in (60, 299):
            rss.append(rss_mib())
    if rss[0] is not None:
        assert rss[1] - rss[0] < 4, rss
