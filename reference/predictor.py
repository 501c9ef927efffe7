"""The low-rank activation predictor (paper section 3.1): per layer, sigmoid(B A x) > threshold predicts the
neurons a token will activate, before its FFN runs.

Its input x is the layer's FFN input: the attention block's output (added to the residual) after the FFN's norm.
It is trained from the model's own ReLU activations with a loss that weighs the rare active neurons as much as
the many inactive ones, so that it errs towards predicting too many (recall over precision).

The lookahead predictor (for the overlap technique) is the same thing one layer on: its layer i guesses layer
i + 1's active set from layer i's FFN input, so that layer i + 1's reads can start while layer i computes. It is
stored beside the predictor (`<name>-lookahead`) and loaded with it where the overlap asks for it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .activations import context_windows
from .errors import CheckpointError
from .model import Transformer


class LowRankPredictor(nn.Module):
    def __init__(self, n_layers: int, d_model: int, d_ffn: int, rank: int):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(d_model, rank, bias=False) for _ in range(n_layers))
        self.up = nn.ModuleList(nn.Linear(rank, d_ffn) for _ in range(n_layers))
        self.rank = rank

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.up[layer](self.down[layer](x))


class Predictor:
    """The `predictor` activation source."""

    name = "predictor"

    def __init__(self, module: LowRankPredictor, threshold: float = 0.5, metrics: dict | None = None,
                 ahead: "Predictor | None" = None):
        """`ahead`: the lookahead predictor, whose layer i guesses layer i + 1's set (held in DRAM as the rest)."""
        self.module = module.eval()
        self.threshold = threshold
        self.cut = math.log(threshold / (1 - threshold))  # sigmoid(z) > t  <=>  z > logit(t)
        self.metrics = metrics or {}
        self.ahead = ahead
        self.nbytes = sum(p.nbytes for p in module.parameters()) + (ahead.nbytes if ahead else 0)

    @torch.inference_mode()
    def sets(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        predicted = (self.module.logits(layer, x.float()) > self.cut).cpu().numpy()  # x may be 16-bit
        return [np.flatnonzero(row) for row in predicted]

    def lookahead(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        """The lookahead predictor's set of layer + 1, the largest logits first."""
        if self.ahead is None:
            raise ValueError("this predictor was loaded without a lookahead predictor (Predictor.load(..., "
                             "lookahead=path))")
        with torch.inference_mode():
            z = self.ahead.module.logits(layer, x.float()).cpu().numpy()
        out = []
        for row in z:
            guessed = np.flatnonzero(row > self.ahead.cut)
            out.append(guessed[np.argsort(-row[guessed], kind="stable")])
        return out

    def reset(self) -> None:
        pass

    def on(self, device: torch.device) -> "Predictor":
        self.module.to(device)
        if self.ahead is not None:
            self.ahead.on(device)
        return self

    def save(self, path: str | Path) -> None:
        """`path`.safetensors (the weights) and `path`.json (shape, threshold, training metrics)."""
        path = Path(path)
        m = self.module
        meta = {"n_layers": len(m.down), "d_model": m.down[0].in_features, "d_ffn": m.up[0].out_features,
                "rank": m.rank, "threshold": self.threshold, "metrics": self.metrics}
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, threshold: float | None = None,
             lookahead: str | Path | None = None) -> "Predictor":
        """The predictor saved at `path`, with the lookahead predictor saved at `lookahead` (`lookahead_path(path)`
        where it was trained with it)."""
        path = Path(path)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            module = LowRankPredictor(meta["n_layers"], meta["d_model"], meta["d_ffn"], meta["rank"])
            module.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot load predictor ({e})") from e
        ahead = cls.load(lookahead, threshold) if lookahead is not None else None
        return cls(module, meta["threshold"] if threshold is None else threshold, meta.get("metrics"), ahead)


def lookahead_path(predictor: str | Path) -> Path:
    """Where the lookahead predictor of the predictor saved at `predictor` is saved."""
    predictor = Path(predictor)
    return predictor.with_name(predictor.name + "-lookahead")


@torch.inference_mode()
def collect(model: Transformer, tokens: list[int], context: int, bos: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the FFN inputs [N, d] and whether each neuron was active [N, f] over `tokens`, in
    `context_windows` as at inference."""
    n = model.config.n_layers
    inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    active: list[list[torch.Tensor]] = [[] for _ in range(n)]
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.ffn.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0][0].clone())))
        hooks.append(block.ffn.act.register_forward_hook(lambda _m, _a, out, i=i: active[i].append(out[0] != 0)))
    try:
        for window in context_windows(tokens, context, bos):
            model(torch.tensor([window]))
    finally:
        for h in hooks:
            h.remove()
    return [(torch.cat(inputs[i]), torch.cat(active[i])) for i in range(n)]


@dataclass
class LayerMetrics:
    recall: float  # of the truly active neurons, the fraction predicted
    precision: float  # of the predicted neurons, the fraction truly active
    predicted_per_active: float  # predicted set size over active set size
    active_fraction: float
    predicted_fraction: float


def evaluate(predictor: Predictor, layer: int, x: torch.Tensor, active: torch.Tensor) -> LayerMetrics:
    with torch.inference_mode():
        predicted = predictor.module.logits(layer, x) > predictor.cut
    hits = (predicted & active).sum().item()
    n_active, n_predicted = active.sum().item(), predicted.sum().item()
    return LayerMetrics(
        recall=hits / max(1, n_active), precision=hits / max(1, n_predicted),
        predicted_per_active=n_predicted / max(1, n_active),
        active_fraction=n_active / active.numel(), predicted_fraction=n_predicted / active.numel(),
    )


def pairs(collected: list[tuple[torch.Tensor, torch.Tensor]],
          lookahead: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) per predictor layer: layer i's FFN input and active set, or with `lookahead` layer i + 1's
    active set."""
    if not lookahead:
        return collected
    return [(x, collected[i + 1][1]) for i, (x, _) in enumerate(collected[:-1])]


def train_predictor(model: Transformer, train_tokens: list[int], heldout_tokens: list[int], bos: int | None,
                    rank: int = 64, epochs: int = 4, batch: int = 1024, lr: float = 3e-3, threshold: float = 0.5,
                    seed: int = 0, progress=print, lookahead: bool = False) -> Predictor:
    """Train every layer's predictor on `train_tokens`, then measure it on `heldout_tokens`; with `lookahead`, the
    lookahead predictor (one layer fewer: layer i guesses layer i + 1)."""
    torch.manual_seed(seed)
    c = model.config
    t0 = time.perf_counter()
    train = pairs(collect(model, train_tokens, c.max_positions, bos), lookahead)
    module = LowRankPredictor(len(train), c.d_model, c.d_ffn, rank)
    generator = torch.Generator().manual_seed(seed)
    for layer, (x, y) in enumerate(train):
        y = y.float()
        positive = y.mean().clamp(min=1e-6)
        pos_weight = (1 - positive) / positive  # active and inactive neurons weigh the same in total
        params = list(module.down[layer].parameters()) + list(module.up[layer].parameters())
        opt = torch.optim.Adam(params, lr=lr)
        steps = epochs * math.ceil(len(x) / batch)
        for step in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=generator)
            loss = F.binary_cross_entropy_with_logits(module.logits(layer, x[idx]), y[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if progress:
            what = f"lookahead layer {layer} -> {layer + 1}" if lookahead else f"predictor layer {layer}"
            progress(f"  {what}: {steps} steps, final loss {loss.item():.4f}")
    predictor = Predictor(module, threshold)
    heldout = pairs(collect(model, heldout_tokens, c.max_positions, bos), lookahead)
    layers = [asdict(evaluate(predictor, i, x, y)) for i, (x, y) in enumerate(heldout)]
    predictor.metrics = {"heldout_layers": layers, "train_tokens": len(train_tokens),
                         "heldout_tokens": len(heldout_tokens), "rank": rank, "epochs": epochs, "seed": seed,
                         "seconds": time.perf_counter() - t0, "lookahead": lookahead}
    return predictor
