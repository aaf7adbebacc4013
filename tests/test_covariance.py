"""Covariance estimation, caching, and the reference SD1.5 covariance."""
import hashlib
import importlib.util

import pytest
import torch

from perfusion_ext.core import covariance as cov_mod
from perfusion_ext.core.captions import caption_corpus
from perfusion_ext.toy.plugin import tiny_random_pipeline


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERFUSION_CACHE", str(tmp_path))
    return tmp_path


def test_estimate_counts_bos_words_first_eos_only():
    """C from a fake encoder equals the explicit mean over exactly BOS + words + first EOS."""
    torch.manual_seed(0)
    table = torch.randn(100, 6, dtype=torch.float64)
    encode = lambda ids: table[ids]  # noqa: E731 - position-free fake encoder
    captions = [[1, 5, 7, 2], [1, 9, 2], [1, 3, 4, 8, 6, 2]]
    got = cov_mod.estimate_covariance(encode, captions, batch_size=2)
    tokens = torch.cat([table[c] for c in captions])
    assert torch.allclose(got, tokens.T @ tokens / len(tokens), rtol=1e-12)


def test_tokenize_has_no_padding():
    pipe = tiny_random_pipeline()
    ids = cov_mod.tokenize_for_covariance(pipe.tokenizer, ["a red circle", "a photo of a blue square on the left"])
    assert ids[0] == [49406, 320, 736, 7117, 49407]
    assert ids[1][0] == 49406 and ids[1][-1] == 49407 and ids[1].count(49407) == 1


def test_cached_covariance_is_estimated_once_per_text_encoder(cache):
    pipe = tiny_random_pipeline()
    captions = caption_corpus(64)
    c1 = cov_mod.cached_covariance(pipe.text_encoder, pipe.tokenizer, captions)
    assert c1.shape == (128, 128) and torch.allclose(c1, c1.T)
    eig = torch.linalg.eigvalsh(c1)
    assert eig.min() > -1e-6 * eig.max()  # PSD up to fp32 storage (LayerNorm can make C singular)
    from perfusion_ext.training.trainer import regularized

    assert torch.linalg.eigvalsh(regularized(c1)).min() > 0
    files = list((cache / "covariance").glob("*.safetensors"))
    assert len(files) == 1
    c2 = cov_mod.cached_covariance(pipe.text_encoder, pipe.tokenizer, ["unused: read from cache"])
    assert torch.allclose(c1.float().double(), c2)
    other = tiny_random_pipeline(seed=1)
    cov_mod.cached_covariance(other.text_encoder, other.tokenizer, captions)
    assert len(list((cache / "covariance").glob("*.safetensors"))) == 2


def test_caption_corpus_is_varied_and_deterministic():
    a, b = caption_corpus(500, seed=0), caption_corpus(500, seed=0)
    assert a == b and len(set(a)) > 450


def test_reference_sd15_covariance(cache):
    if importlib.util.find_spec("perfusion_pytorch") is None:
        pytest.skip("perfusion-pytorch not installed")
    c = cov_mod.reference_covariance_sd15()
    assert c.shape == (768, 768) and torch.allclose(c, c.T, atol=1e-3)
    assert (cache / "covariance" / "reference_clip_vit_l14.safetensors").is_file()
    assert torch.equal(cov_mod.reference_covariance_sd15(), c)  # from the converted cache now
    assert cov_mod.REFERENCE_SD15_SHA256 == "bae743eee378894d29eaf313740244e6fabc86623aa803c695eddac33f0d03a5"


def test_reference_sha_mismatch_is_refused(cache, monkeypatch, tmp_path):
    if importlib.util.find_spec("perfusion_pytorch") is None:
        pytest.skip("perfusion-pytorch not installed")
    monkeypatch.setattr(cov_mod, "REFERENCE_SD15_SHA256", hashlib.sha256(b"other").hexdigest())
    with pytest.raises(cov_mod.PerfusionError, match="expected .* reinstall"):
        cov_mod.reference_covariance_sd15()
