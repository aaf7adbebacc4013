"""Hooks on real UNet classes (diffusers and A1111's ldm), SD1.5 topology at toy widths."""
import pytest
import torch
from conftest import make_concept, run_unet, tiny_diffusers_unet, tiny_ldm_unet, unet_inputs

import perfusion_ext as pf
from perfusion_ext.core.layers import cross_attention_layers, model_family

SD15_LAYERS = (
    [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in (1, 2, 4, 5, 7, 8)]
    + ["middle_block.1.transformer_blocks.0.attn2"]
    + [f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(3, 12)]
)


def state_bytes(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_layer_discovery_and_canonical_names():
    d, l = cross_attention_layers(tiny_diffusers_unet()), cross_attention_layers(tiny_ldm_unet())
    assert sorted(d) == sorted(l) == sorted(SD15_LAYERS)
    assert {k: v.out_dim for k, v in d.items()} == {k: v.out_dim for k, v in l.items()}
    assert model_family(d) == model_family(l) == "sd1"
    assert d["down_blocks.0.attentions.0.transformer_blocks.0.attn2".replace(
        "down_blocks.0.attentions.0", "input_blocks.1.1")].module_path == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def test_mapping_follows_structure_not_sd15_table():
    """Two transformer layers per block and 3 levels (SDXL-like depth): names come from the structure."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64), layers_per_block=2, transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=2048, attention_head_dim=2, norm_num_groups=32,
    )
    names = sorted(cross_attention_layers(unet))
    expected = sorted(
        [f"input_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in (4, 5, 7, 8) for k in range(2)]
        + [f"middle_block.1.transformer_blocks.{k}.attn2" for k in range(2)]
        + [f"output_blocks.{i}.1.transformer_blocks.{k}.attn2" for i in range(0, 6) for k in range(2)]
    )
    assert names == expected  # SDXL's sgm naming for this topology
    assert model_family(cross_attention_layers(unet)) == "sdxl"


def test_activate_changes_output_and_restores_bit_for_bit(unet):
    x, t, ctx = unet_inputs(unet)
    concept = make_concept(unet)
    ctx[:, 4] = concept.target_input  # the concept token at position 4
    before_state = state_bytes(unet)
    base = run_unet(unet, x, t, ctx)
    with pf.activate(unet, [concept]):
        edited = run_unet(unet, x, t, ctx)
    after = run_unet(unet, x, t, ctx)
    assert (edited - base).abs().max() > 1e-3 * base.abs().max()
    assert torch.equal(after, base)
    assert all(torch.equal(v, before_state[k]) for k, v in unet.state_dict().items())
    assert all(not m._forward_hooks for m in unet.modules())


def test_hooks_removed_when_sampling_raises(unet):
    x, t, ctx = unet_inputs(unet)
    base = run_unet(unet, x, t, ctx)
    with pytest.raises(RuntimeError, match="boom"):
        with pf.activate(unet, [make_concept(unet)]):
            run_unet(unet, x, t, ctx)
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in unet.modules())
    assert torch.equal(run_unet(unet, x, t, ctx), base)


def test_every_attn2_projection_is_edited(unet):
    concept = make_concept(unet)
    layers = cross_attention_layers(unet)
    hooked = set()
    with pf.activate(unet, [concept]):
        for layer in layers.values():
            assert layer.to_k._forward_hooks and layer.to_v._forward_hooks
            hooked.update({id(layer.to_k), id(layer.to_v)})
    assert len(hooked) == 32


def test_key_locking_through_the_hook(unet):
    """At e = i* with an always-open gate, every hooked to_k returns W_k i_super (the stored key target)."""
    concept = make_concept(unet)
    layers = cross_attention_layers(unet)
    e = concept.target_input[None, None]
    with pf.activate(unet, [concept], beta=-1e9, tau=1.0):
        for name, layer in layers.items():
            got = layer.to_k(e)[0, 0]
            ref = concept.key_targets[name]
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
            got_v = layer.to_v(e)[0, 0]
            assert torch.allclose(got_v, concept.value_targets[name], rtol=1e-4, atol=1e-4)


def test_strength_zero_and_pairs(unet):
    x, t, ctx = unet_inputs(unet)
    a, b = make_concept(unet, "a", seed=1), make_concept(unet, "b", seed=2)
    ctx[:, 3], ctx[:, 6] = a.target_input, b.target_input
    base = run_unet(unet, x, t, ctx)
    with pf.activate(unet, [(a, 0.0), (b, 0.0)]):
        assert torch.equal(run_unet(unet, x, t, ctx), base)
    with pf.activate(unet, [a, b], strength=1.0):
        both = run_unet(unet, x, t, ctx)
    with pf.activate(unet, [(a, 1.0), (b, 1.0)]):
        assert torch.equal(run_unet(unet, x, t, ctx), both)
    with pf.activate(unet, [a]):
        only_a = run_unet(unet, x, t, ctx)
    assert not torch.allclose(only_a, both)


def test_permuting_context_tokens_permutes_kv(unet):
    concept = make_concept(unet)
    layer = next(iter(cross_attention_layers(unet).values()))
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 77, concept.dim, generator=g)
    ctx[0, 10] = concept.target_input
    perm = torch.randperm(77, generator=g)
    with pf.activate(unet, [concept]):
        for proj in (layer.to_k, layer.to_v):
            assert torch.allclose(proj(ctx[:, perm]), proj(ctx)[:, perm], rtol=1e-5, atol=1e-5)


def test_composes_with_patched_linear_forward(unet, monkeypatch):
    """A1111's Lora replaces torch.nn.Linear.forward; hooks must add on top of the patched output."""
    concept = make_concept(unet)
    layer = next(iter(cross_attention_layers(unet).values()))
    e = torch.randn(1, 5, concept.dim)
    with pf.activate(unet, [concept]):
        hooked_plain = layer.to_k(e)
    original = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: original(self, x) + 1.0)
    with pf.activate(unet, [concept]):
        hooked_patched = layer.to_k(e)
    assert torch.allclose(hooked_patched, hooked_plain + 1.0, atol=1e-5)
    assert torch.allclose(layer.to_k(e), original(layer.to_k, e) + 1.0)


def test_half_precision_model_keeps_fp32_gate(unet):
    concept = make_concept(unet)
    layer = next(iter(cross_attention_layers(unet).values()))
    e = concept.target_input[None, None].repeat(1, 3, 1)
    with pf.activate(unet, [concept]):
        ref = layer.to_v(e)
    half = torch.nn.Linear(layer.to_v.in_features, layer.to_v.out_features, bias=False).half()
    half.weight.data.copy_(layer.to_v.weight.data.half())
    from perfusion_ext.core.gated_edit import stack_edit
    edit = stack_edit([(concept, 1.0, concept.beta, concept.tau)], "value", layer.name)
    out16 = edit.apply(e.half(), half(e.half()), half.weight)
    assert out16.dtype == torch.float16
    assert (out16.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_mismatched_concept_raises_and_leaves_model_untouched(unet):
    wrong_dim = make_concept(tiny_diffusers_unet(context_dim=1024), family="sd2")
    with pytest.raises(pf.PerfusionError, match="trained for sd2; the loaded model is sd1"):
        with pf.activate(unet, [wrong_dim]):
            pass
    concept = make_concept(unet)
    name = concept.layers[0]
    concept.value_targets[name] = torch.zeros(7)
    concept.key_targets[name] = torch.zeros(7)
    with pytest.raises(pf.PerfusionError, match="has 7 values, the model's projection outputs"):
        with pf.activate(unet, [concept]):
            pass
    concept = make_concept(unet)
    concept.key_targets["input_blocks.99.1.transformer_blocks.0.attn2"] = torch.zeros(3)
    concept.value_targets["input_blocks.99.1.transformer_blocks.0.attn2"] = torch.zeros(3)
    with pytest.raises(pf.PerfusionError, match="does not have"):
        with pf.activate(unet, [concept]):
            pass
    assert all(not m._forward_hooks for m in unet.modules())


def test_inference_computes_the_coefficients_once_per_text_and_matches_the_training_path(unet, monkeypatch):
    """The fast path shares [w g | w α] across all 32 projections and keeps [O* ; −(W I*)ᵀ] until W changes; it
    gives the same output as the uncached autograd path, and follows in-place changes of the text and of W."""
    from perfusion_ext.core.gated_edit import ProjectionEdit

    concepts = [make_concept(unet, name="teddy", seed=1), make_concept(unet, name="robot", seed=2)]
    x, t, ctx = unet_inputs(unet)
    ctx[:, 3] = concepts[0].target_input
    calls = []
    original = ProjectionEdit.coefficients
    monkeypatch.setattr(ProjectionEdit, "coefficients", lambda self, e: calls.append(1) or original(self, e))
    with pf.activate(unet, [(concepts[0], 0.8), concepts[1]]):
        fast = run_unet(unet, x, t, ctx)
        assert len(calls) == 1  # once for 32 projections
        run_unet(unet, x, t, ctx)
        assert len(calls) == 1  # the same text at the next step: nothing recomputed
        with torch.enable_grad():
            slow = unet(x, t, encoder_hidden_states=ctx).sample if hasattr(unet, "down_blocks") else \
                unet(x, timesteps=t, context=ctx)
        assert len(calls) == 1 + 32  # the autograd path caches nothing
        # fp32 summation order differs (one MatMul vs two); this random UNet amplifies it to ~1e-4 in both paths
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-3, atol=5e-4)
        ctx.mul_(1.0001)  # changed in place: recomputed
        run_unet(unet, x, t, ctx)
        assert len(calls) == 1 + 32 + 1
        layer = next(iter(cross_attention_layers(unet).values()))
        with torch.no_grad():
            layer.to_v.weight.mul_(1.5)  # a Lora-style in-place weight patch
        patched = run_unet(unet, x, t, ctx)
    with torch.enable_grad(), pf.activate(unet, [(concepts[0], 0.8), concepts[1]]):
        reference = (unet(x, t, encoder_hidden_states=ctx).sample if hasattr(unet, "down_blocks")
                     else unet(x, timesteps=t, context=ctx)).detach()
    with torch.no_grad():
        layer.to_v.weight.div_(1.5)
    torch.testing.assert_close(patched, reference, rtol=1e-3, atol=5e-4)
    assert (patched - fast).abs().max() > 4 * 5e-4  # the patch changed the output well beyond the tolerance
