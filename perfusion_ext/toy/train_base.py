"""Train the toy base model from scratch: `python -m perfusion_ext.toy.train_base`.

One reproducible command. It trains the VAE first (a few minutes), then the UNet and text encoder
jointly on freshly rendered scenes, checkpoints every `--checkpoint-minutes` (atomically), evaluates
attribute accuracy on held-out prompts every `--eval-minutes`, and resumes from its work folder.
`--export` writes the EMA weights as the committed diffusers folder (fp16) and the fp32 resume file.
Diffusion batches are sampled and rendered on the training device (`--device cuda` on a GPU machine).
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..core.atomic import atomic_save_safetensors, atomic_write_json
from . import checkers, pairs, world
from . import model as toy_model
from .evaluate import evaluate_named, evaluate_pairs, evaluate_pipeline, evaluate_two_named, make_pipeline
from .training_data import SceneSampler, WorldV2Sampler

RESUME_FILE = Path(__file__).resolve().parents[2] / "training" / "toy_base_resume.safetensors"


def images_to_tensor(images, device=None) -> torch.Tensor:
    """uint8 N×H×W×3 images (numpy or torch) → float N×3×H×W in [-1, 1] on `device`."""
    return torch.as_tensor(images, device=device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Trainer:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        self.tokenizer = load_toy_tokenizer()
        self.vae = toy_model.build_vae()
        self.vae_best = toy_model.build_vae().requires_grad_(False)  # best validation snapshot
        self.unet = toy_model.build_unet()
        self.text_encoder = toy_model.build_text_encoder()
        self.vae_anchor = toy_model.build_vae().requires_grad_(False)  # world v2: the VAE whose latents stay
        self.ema_unet = toy_model.build_unet().requires_grad_(False)
        self.ema_text_encoder = toy_model.build_text_encoder().requires_grad_(False)
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.ema_text_encoder.load_state_dict(self.text_encoder.state_dict())
        for module in self._modules().values():
            module.to(self.device)
        self.scheduler = toy_model.build_train_scheduler()
        self.optimizer = self._make_optimizer()
        # warmup_origin: the step at which the optimizer state started afresh (learning-rate warm-up).
        self.state = {"phase": "vae", "vae_step": 0, "step": 0, "images_seen": 0, "train_seconds": 0.0,
                      "vae_scaling_factor": 1.0, "warmup_origin": 0}
        self.rng = np.random.default_rng(args.seed)
        self.vae_optimizer = torch.optim.Adam(self.vae.parameters(), lr=1e-3)

    @functools.cached_property
    def sampler(self) -> SceneSampler | WorldV2Sampler:
        """Built on first use: tokenizing every training caption is wasted on VAE-only or export-only calls."""
        if self.args.world == "v2":
            return WorldV2Sampler(self.tokenizer, self.device, seed=self.args.seed, pair_share=self.args.pair_share,
                                  named_share=self.args.named_share, two_named_share=self.args.two_named_share)
        return SceneSampler(self.tokenizer, self.device, seed=self.args.seed)

    def _make_optimizer(self):
        no_decay, decay = [], []
        for module in (self.unet, self.text_encoder):
            for name, p in module.named_parameters():
                (no_decay if ("embedding" in name or p.ndim < 2) else decay).append(p)
        # Token table rows never used get zero gradient and, without weight decay, stay untouched.
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.args.lr, betas=(0.9, 0.99), fused=self.device.type == "cuda",
        )

    # ---- checkpointing -------------------------------------------------------------------
    def _modules(self):
        modules = {"vae": self.vae, "vae_best": self.vae_best, "unet": self.unet, "text_encoder": self.text_encoder,
                   "ema_unet": self.ema_unet, "ema_text_encoder": self.ema_text_encoder}
        if self.args.world == "v2":
            modules["vae_anchor"] = self.vae_anchor
        return modules

    def save(self):
        tensors = {}
        for prefix, module in self._modules().items():
            for k, v in module.state_dict().items():
                tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
        # Both optimizers: a fresh Adam state takes full-size first steps (a resumed VAE fine-tune jumped).
        tensors.update(_optimizer_tensors(self.optimizer, "opt"))
        tensors.update(_optimizer_tensors(self.vae_optimizer, "vae_opt"))
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.sampler"] = self.sampler.state().cpu()
        atomic_save_safetensors(tensors, self.work / "checkpoint.safetensors")
        meta = dict(self.state, numpy_rng=self.rng.bit_generator.state)
        atomic_write_json(meta, self.work / "checkpoint.json")

    def load(self) -> bool:
        ckpt = self.work / "checkpoint.safetensors"
        if ckpt.exists():
            tensors = load_file(ckpt)
            meta = json.loads((self.work / "checkpoint.json").read_text())
            self.rng.bit_generator.state = meta.pop("numpy_rng")
            self.state.update(meta)
            for prefix, module in self._modules().items():
                module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items()
                                        if k.startswith(prefix + ".")})
            _restore_optimizer(self.optimizer, tensors, "opt")
            _restore_optimizer(self.vae_optimizer, tensors, "vae_opt")
            torch.set_rng_state(tensors["rng.torch"])
            if "rng.sampler" in tensors:
                self.sampler.set_state(tensors["rng.sampler"])
            return True
        if self.args.from_scratch:
            return False
        # Committed resume point: EMA weights only (the optimizer state is not committed), in fp32 —
        # or, where that file was left behind (it is too big for some transfers), the fp16 model folder.
        if RESUME_FILE.exists():
            tensors = load_file(RESUME_FILE)
        else:
            tensors = committed_model_weights()
            print(f"{RESUME_FILE.name} missing: starting from the committed fp16 model", flush=True)
        self.state.update(json.loads(RESUME_FILE.with_suffix(".json").read_text()))
        for prefix, module in (("vae", self.vae), ("unet", self.unet), ("text_encoder", self.text_encoder),
                               ("unet", self.ema_unet), ("text_encoder", self.ema_text_encoder)):
            module.load_state_dict({k[len(prefix) + 1:]: v.float() for k, v in tensors.items()
                                    if k.startswith(prefix + ".")})
        self.state["warmup_origin"] = self.state["step"]
        if self.args.world == "v2" and self.state.get("world") != "v2":
            self._start_world_v2()
        return True

    def _start_world_v2(self):
        """Move a world-v1 model to world v2: first the VAE learns two-object scenes while its latents of
        one-object scenes stay where they were (so the UNet stays valid), then the UNet follows."""
        self.vae_anchor.load_state_dict(self.vae.state_dict())
        self.state.update(world="v2", phase="vae_v2", vae_v2_step=0)
        print("world v2: fine-tuning the VAE on two-object scenes, one-object latents anchored", flush=True)

    def export(self):
        """Write the committed artefacts: fp32 EMA resume file and the fp16 diffusers model folder."""
        tensors = {}
        for prefix, module in (("vae", self.vae), ("unet", self.ema_unet), ("text_encoder", self.ema_text_encoder)):
            for k, v in module.state_dict().items():
                tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
        RESUME_FILE.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, RESUME_FILE)
        atomic_write_json({k: self.state[k] for k in ("world", "phase", "vae_step", "vae_v2_step", "step", "images_seen",
                                                      "train_seconds", "vae_scaling_factor", "hardware")
                           if k in self.state},
                          RESUME_FILE.with_suffix(".json"))
        pipe = self.pipeline(ema=True)
        pipe.to(torch.float16).save_pretrained(toy_model.MODEL_DIR, safe_serialization=True)
        pipe.to(torch.float32)
        # 3.6 MB that vocab.json + merges.txt already say (the same ids, tested): keeps the model under 30 MB
        (toy_model.MODEL_DIR / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
        record = toy_model.MODEL_DIR.parent / "model_training.json"
        # The committed curve plus this work folder's evaluations (a new work folder starts a new eval.jsonl).
        evals = json.loads(record.read_text()).get("evaluations", []) if record.is_file() else []
        if (self.work / "eval.jsonl").is_file():
            seen = {e["images_seen"] for e in evals}
            evals += [e for e in (json.loads(line) for line in (self.work / "eval.jsonl").read_text().splitlines() if line)
                      if e["images_seen"] not in seen]
        summary = f"{self.state['images_seen']:,} images ({self.state['step']:,} steps) in " + "; ".join(
            f"{seg['seconds'] / 60:.0f} min on {seg['hardware']} ({seg['images']:,} images, batch {seg['batch']})"
            for seg in self.hardware_log())
        atomic_write_json({"summary": summary, "state": {k: v for k, v in self.state.items()},
                           "args": vars(self.args), "evaluations": evals},
                          record)

    def pipeline(self, ema: bool):
        self.vae.register_to_config(scaling_factor=self.state["vae_scaling_factor"])  # saved with the model
        return make_pipeline(
            vae=self.vae,
            text_encoder=self.ema_text_encoder if ema else self.text_encoder,
            unet=self.ema_unet if ema else self.unet,
            tokenizer=self.tokenizer,
        )

    # ---- VAE -----------------------------------------------------------------------------
    def train_vae_step(self):
        images, _ = world.training_batch(self.rng, 32, drop_caption=0.0)
        x = images_to_tensor(images, self.device)
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        self.vae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        # Cosine decay: a constant 1e-3 diverged late in an earlier run.
        progress = self.state["vae_step"] / self.args.vae_steps
        for g in self.vae_optimizer.param_groups:
            g["lr"] = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * progress))
        self.vae_optimizer.step()
        if (self.state["vae_step"] + 1) % 250 == 0:
            self.validate_vae()
        return loss.detach()

    @torch.no_grad()
    def vae_agreement(self, vae) -> tuple[float, float]:
        """(share of reconstructions the checkers read exactly like the original, mean abs error /255)."""
        images, _ = world.training_batch(np.random.default_rng(1234), 256, drop_caption=0.0)
        recon = vae.decode(vae.encode(images_to_tensor(images, self.device)).latent_dist.mode()).sample
        recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        agree = float(np.mean([checkers.read(r) == checkers.read(t) for r, t in zip(recon, images)]))
        return agree, float(np.abs(recon.astype(np.int16) - images.astype(np.int16)).mean())

    def validate_vae(self):
        agree, err = self.vae_agreement(self.vae)
        best = self.state.get("vae_best", [-1.0, 0.0])
        if (agree, -err) > (best[0], -best[1]):
            self.vae_best.load_state_dict(self.vae.state_dict())
            self.state["vae_best"] = [agree, err]
        print(f"VAE validation: read back identically {agree:.1%}, mean abs error {err:.2f}/255", flush=True)

    @torch.no_grad()
    def finish_vae(self):
        self.validate_vae()
        self.vae.load_state_dict(self.vae_best.state_dict())
        images, _ = world.training_batch(np.random.default_rng(1234), 256, drop_caption=0.0)
        latents = self.vae.encode(images_to_tensor(images, self.device)).latent_dist.sample()
        self.state["vae_scaling_factor"] = float(1.0 / latents.std())
        self.state["phase"] = "diffusion"
        print(f"VAE: kept the best snapshot, {self.state['vae_best']}", flush=True)

    # ---- VAE, world v2 --------------------------------------------------------------------
    @staticmethod
    def _v2_vae_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[pairs.PairScene]]:
        """(n one-object images, n two-object images, their scenes)."""
        singles, _ = world.training_batch(rng, n, drop_caption=0.0)
        scenes = [pairs.random_scene(rng) for _ in range(n)]
        return singles, np.stack([pairs.render(scene) for scene in scenes]), scenes

    def train_vae_v2_step(self):
        singles, doubles, _ = self._v2_vae_batch(self.rng, 16)
        x = images_to_tensor(np.concatenate([singles, doubles]), self.device)
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        with torch.no_grad():
            anchor = self.vae_anchor.encode(x[:len(singles)]).latent_dist.mean
        drift = F.mse_loss(posterior.mean[:len(singles)], anchor) * self.state["vae_scaling_factor"] ** 2
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean() + self.args.anchor_weight * drift
        self.vae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        for g in self.vae_optimizer.param_groups:
            g["lr"] = self.args.vae_v2_lr
        self.vae_optimizer.step()
        self.state["vae_v2_step"] += 1
        if self.state["vae_v2_step"] % 100 == 0:
            self.validate_vae_v2()
        if self.state["vae_v2_step"] >= self.args.vae_v2_steps:
            self.state["phase"] = "diffusion"
            self.state["warmup_origin"] = self.state["step"]
            print("world v2: VAE done, training the UNet and text encoder on both worlds", flush=True)
        return loss.detach()

    @torch.no_grad()
    def validate_vae_v2(self) -> dict:
        """Round trips read back (one-object: identical reading; two-object: both parts right) and the
        relative drift of one-object latents from the anchored VAE's."""
        singles, doubles, scenes = self._v2_vae_batch(np.random.default_rng(1234), 128)
        x = images_to_tensor(np.concatenate([singles, doubles]), self.device)
        mean = self.vae.encode(x).latent_dist.mean
        recon = self.vae.decode(mean).sample
        recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        single_ok = np.mean([checkers.read(r) == checkers.read(t) for r, t in zip(recon[:128], singles)])
        pair_ok = np.mean([checkers.read_pair(r, s.colour_a, s.shape_a, s.relation, s.colour_b, s.shape_b).both_right
                           for r, s in zip(recon[128:], scenes)])
        anchor = self.vae_anchor.encode(x[:128]).latent_dist.mean
        drift = float((mean[:128] - anchor).norm() / anchor.norm())
        result = {"one_object": float(single_ok), "two_object": float(pair_ok), "latent_drift": drift}
        self.state["vae_v2_validation"] = result
        print(f"VAE v2 step {self.state['vae_v2_step']}: {json.dumps(result)}", flush=True)
        return result

    # ---- diffusion -----------------------------------------------------------------------
    def learning_rate(self, run_progress: float) -> float:
        """Warm-up over 500 steps after a fresh optimizer state; with --decay, cosine to 10 % over this call."""
        lr = self.args.lr * min(1.0, (self.state["step"] - self.state["warmup_origin"] + 1) / 500)
        if self.args.decay:
            lr *= 0.1 + 0.45 * (1 + np.cos(np.pi * min(1.0, run_progress)))
        return lr

    def train_diffusion_step(self, run_progress: float) -> torch.Tensor:
        images, ids = self.sampler.sample(self.args.batch)
        with torch.no_grad():
            latents = self.vae.encode(images_to_tensor(images)).latent_dist.sample() * self.state["vae_scaling_factor"]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = self.scheduler.get_velocity(latents, noise, t)
        text = self.text_encoder(ids).last_hidden_state
        pred = self.unet(noisy, t, text).sample
        loss = F.mse_loss(pred, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        for g in self.optimizer.param_groups:
            g["lr"] = self.learning_rate(run_progress)
        self.optimizer.step()
        self._update_ema()
        self.state["step"] += 1
        self.state["images_seen"] += len(images)
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self):
        decay = min(self.args.ema, (1 + self.state["step"]) / (10 + self.state["step"]))
        for ema, live in ((self.ema_unet, self.unet), (self.ema_text_encoder, self.text_encoder)):
            torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1.0 - decay)

    def hardware_log(self) -> list[dict]:
        """Training time per hardware; runs before this log existed were CPU-only (2 cores, batch 64)."""
        return self.state.setdefault("hardware", [
            {"hardware": "2 CPU threads (x86_64)", "seconds": self.state["train_seconds"],
             "images": self.state["images_seen"], "batch": 64}] if self.state["images_seen"] else [])

    def hardware_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"{torch.get_num_threads()} CPU threads ({platform.machine()})"

    def evaluate(self):
        pipe = self.pipeline(ema=True)
        result = evaluate_pipeline(pipe, n_prompts=self.args.eval_prompts, grid_path=self.work / "eval_grid.png")
        if self.args.world == "v2":
            result.update(evaluate_pairs(pipe, n_prompts=self.args.pair_eval_prompts,
                                         grid_path=self.work / "eval_pairs_grid.png"))
            result.update(evaluate_named(pipe, n_prompts=self.args.named_eval_prompts,
                                         grid_path=self.work / "eval_named_grid.png"))
            if self.args.two_named_share > 0:
                result.update(evaluate_two_named(pipe, n_prompts=self.args.two_named_eval_prompts,
                                                 grid_path=self.work / "eval_two_named_grid.png"))
        result.update(step=self.state["step"], images_seen=self.state["images_seen"],
                      train_minutes=round(self.state["train_seconds"] / 60, 1))
        with open(self.work / "eval.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print("EVAL", json.dumps(result), flush=True)

    def run(self):
        resumed = self.load()
        self.hardware_log()  # attribute earlier (pre-log) training before this call adds its own
        interrupted = self.state.pop("hardware_current", None)  # a run stopped after its last checkpoint
        if interrupted:
            self.hardware_log().append(interrupted)
        print(f"{'resumed' if resumed else 'started'}: {self.state}", flush=True)
        started = time.time()
        deadline = started + self.args.minutes * 60
        progress_at_start = (self.state["vae_step"], self.state.get("vae_v2_step"), self.state["step"])
        segment = {"hardware": self.hardware_name(), "seconds": 0.0, "images": 0, "batch": self.args.batch}
        self.state["hardware_current"] = segment  # checkpointed with the state, so a killed run still counts
        images_at_start = self.state["images_seen"]
        last_ckpt = last_eval = time.time()
        losses = []
        while time.time() < deadline:
            t0 = time.time()
            if self.state["phase"] == "vae_v2":
                losses.append(self.train_vae_v2_step())
            elif self.state["phase"] == "vae":
                losses.append(self.train_vae_step())
                self.state["vae_step"] += 1
                if self.state["vae_step"] >= self.args.vae_steps:
                    self.finish_vae()
                    print(f"VAE done, scaling factor {self.state['vae_scaling_factor']:.4f}", flush=True)
            else:
                losses.append(self.train_diffusion_step((t0 - started) / max(1.0, deadline - started)))
            self.state["train_seconds"] += time.time() - t0
            segment["seconds"] += time.time() - t0
            segment["images"] = self.state["images_seen"] - images_at_start
            n = {"diffusion": self.state["step"], "vae": self.state["vae_step"]}.get(self.state["phase"],
                                                                                    self.state.get("vae_v2_step", 0))
            if n % 100 == 0:
                print(f"{self.state['phase']} step {n} loss {torch.stack(losses).mean():.4f} "
                      f"seen {self.state['images_seen']} t {self.state['train_seconds'] / 60:.1f} min "
                      f"lr {self.optimizer.param_groups[0]['lr']:.2e}", flush=True)
                losses = []
            if time.time() - last_ckpt > self.args.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.time()
            if self.state["phase"] == "diffusion" and time.time() - last_eval > self.args.eval_minutes * 60:
                self.evaluate()
                last_eval = time.time()
        self.state.pop("hardware_current")
        # Never rewrite an unchanged state.
        if (self.state["vae_step"], self.state.get("vae_v2_step"), self.state["step"]) != progress_at_start:
            self.hardware_log().append(segment)
            if self.args.eval_at_end and self.state["phase"] == "diffusion":
                self.evaluate()
            self.save()
        if self.args.export:
            self.export()


def _optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """An Adam(W) state as flat tensors: PREFIX.i.exp_avg / .exp_avg_sq / .step per parameter index."""
    tensors = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = optimizer.state.get(p)
        if st:
            tensors[f"{prefix}.{i}.exp_avg"] = st["exp_avg"].cpu()
            tensors[f"{prefix}.{i}.exp_avg_sq"] = st["exp_avg_sq"].cpu()
            tensors[f"{prefix}.{i}.step"] = torch.as_tensor(st["step"]).reshape(1).float().cpu()
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"{prefix}.{i}.exp_avg" in tensors:
            optimizer.state[p] = {
                "exp_avg": tensors[f"{prefix}.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"{prefix}.{i}.exp_avg_sq"].to(p.device),
                "step": tensors[f"{prefix}.{i}.step"].reshape(()).to(p.device),
            }


def committed_model_weights() -> dict[str, torch.Tensor]:
    """The committed diffusers folder's weights under the resume file's prefixes (vae., unet., text_encoder.)."""
    files = {"vae": "vae/diffusion_pytorch_model.safetensors", "unet": "unet/diffusion_pytorch_model.safetensors",
             "text_encoder": "text_encoder/model.safetensors"}
    return {f"{prefix}.{k}": v for prefix, name in files.items()
            for k, v in load_file(toy_model.MODEL_DIR / name).items()}


def load_toy_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(toy_model.MODEL_DIR / "tokenizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="toy_train", help="checkpoint/eval folder (resumed when present)")
    p.add_argument("--minutes", type=float, default=60.0, help="training time budget for this call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--eval-minutes", type=float, default=30.0)
    p.add_argument("--eval-prompts", type=int, default=219)
    p.add_argument("--decay", action="store_true",
                   help="cosine-decay the learning rate to 10%% over this call's --minutes (a final run)")
    p.add_argument("--eval-at-end", action="store_true", help="evaluate once more when the time is up")
    p.add_argument("--export", action="store_true", help="write the committed model folder at the end")
    p.add_argument("--from-scratch", action="store_true", help="ignore the committed resume file")
    p.add_argument("--world", choices=("v1", "v2"), default="v1",
                   help="v2 adds two-object scenes and colourless captions (fine-tunes the VAE first)")
    p.add_argument("--vae-v2-steps", type=int, default=2000, help="world v2: VAE fine-tuning steps (batch 32)")
    p.add_argument("--vae-v2-lr", type=float, default=3e-4, help="world v2: VAE fine-tuning learning rate")
    p.add_argument("--anchor-weight", type=float, default=1.0,
                   help="world v2: weight of the one-object latent anchor while fine-tuning the VAE")
    p.add_argument("--pair-share", type=float, default=0.5,
                   help="world v2: share of two-object scenes in each batch (the rest are one-object scenes)")
    p.add_argument("--pair-eval-prompts", type=int, default=120, help="world v2: held-out two-object prompts")
    p.add_argument("--named-share", type=float, default=0.0,
                   help="world v2: share of named two-part objects (\"a rocket\") in each batch, taken before pairs")
    p.add_argument("--named-eval-prompts", type=int, default=60, help="world v2: held-out named-object prompts")
    p.add_argument("--two-named-share", type=float, default=0.0,
                   help="world v2: share of scenes with two named objects (\"a rocket on the left and a bell on the "
                        "right\"), taken first")
    p.add_argument("--two-named-eval-prompts", type=int, default=40,
                   help="world v2: held-out two-named-object prompts (evaluated when --two-named-share > 0)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    Trainer(args).run()


if __name__ == "__main__":
    main()
