"""Weight fingerprints: stable, sensitive to every byte, and defined for 0-dim parameters (SD2's OpenCLIP)."""
import torch

from perfusion_ext.core.fingerprint import module_hash


def test_module_hash_handles_zero_dim_parameters_and_every_byte():
    module = torch.nn.Linear(3, 2)
    module.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))  # 0-dim, as in OpenCLIP text towers
    first = module_hash(module)
    assert first == module_hash(module) and len(first) == 64
    with torch.no_grad():
        module.logit_scale += 1e-3
    assert module_hash(module) != first
    with torch.no_grad():
        module.logit_scale -= 1e-3
        module.weight[0, 0] += 1e-6
    assert module_hash(module) != first


def test_module_hash_unchanged_for_ordinary_tensors():
    """The reshape that admits 0-dim tensors must not change any existing concept's recorded hash."""
    import hashlib

    module = torch.nn.Linear(4, 3)
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    assert module_hash(module) == digest.hexdigest()
