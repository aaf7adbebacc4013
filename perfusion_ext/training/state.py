"""Everything a training run needs to continue exactly where it stopped, as safetensors + JSON.

Parameters, Adam moments, EMA targets (i*, i_super), the noise generator, the numpy RNG and the
data order: resuming from this state reproduces the uninterrupted run bit for bit on the same device.
"""
from __future__ import annotations

import torch


def save_state(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {name: p.detach().clone() for name, p in trainer.params().items()}
    tensors["i_star"] = trainer.i_star.clone()
    tensors["i_super"] = trainer.i_super.clone()
    tensors["rng.noise"] = trainer.noise_gen.get_state()
    names = {id(p): name for name, p in trainer.params().items()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            st = trainer.optimizer.state.get(p)
            if st:
                tensors[f"adam.{names[id(p)]}.exp_avg"] = st["exp_avg"].clone()
                tensors[f"adam.{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"].clone()
                tensors[f"adam.{names[id(p)]}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    meta = {
        "step": trainer.step,
        "losses": trainer.losses,
        "order": trainer.order,
        "numpy_rng": trainer.rng.bit_generator.state,
    }
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def load_state(trainer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    with torch.no_grad():
        for name, p in trainer.params().items():
            p.copy_(tensors[name])
    trainer.i_star = tensors["i_star"].clone()
    trainer.i_super = tensors["i_super"].clone()
    trainer.noise_gen.set_state(tensors["rng.noise"])
    for name, p in trainer.params().items():
        if f"adam.{name}.exp_avg" in tensors:
            trainer.optimizer.state[p] = {
                "exp_avg": tensors[f"adam.{name}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].clone(),
                "step": tensors[f"adam.{name}.step"].reshape(()).float(),
            }
    trainer.step = int(meta["step"])
    trainer.losses = list(meta["losses"])
    trainer.order = list(meta["order"])
    trainer.rng.bit_generator.state = meta["numpy_rng"]
