"""Active-set traces for synthetic models: which neurons each token needs, per layer, from a stated profile.

A profile gives, per layer, the fraction of the FFN predicted per token and the fraction that is *new* per token
against a window of the last k tokens. The generator draws each layer's sets from a Markov process: every neuron
has a fixed popularity (log-normal, so some neurons are hot, as in real models); from one token to the next each
predicted neuron stays with probability `stay`, and the set is refilled to its size by popularity. `stay` is found
by bisection so the new-per-token fraction meets the profile's; what was achieved is recorded beside the target.

The overlap technique needs a guess of each layer's set made one layer earlier (the lookahead), most confident
first. A trace's guesses (`lookahead`) are drawn to rank as a trained lookahead predictor ranks: every neuron of the
layer gets a score, N(LOOKAHEAD_SEPARATION, 1) for the layer's set and N(0, 1) for the rest, and the guess is the
LOOKAHEAD_SIZE x |set| highest, highest first.

Profiles:
- `paper-opt-6.7b`: the paper's OPT 6.7B figures, about 10% of the FFN predicted per token and about 2.4% new per
  token with a window of 5, in every layer;
- `embedded-<model>`: measured from an embedded model's predictor on held-out text, per layer, mapped onto the
  synthetic model's layers by relative depth.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flashbench.reference.errors import FlashbenchError

POPULARITY_SIGMA = 1.0  # log-normal spread of neuron popularity
CALIBRATION_TOKENS = 48
# Measured on shakespeare-opt's lookahead predictor (suite/models/shakespeare-opt/predictor-lookahead.json), layers
# 2-5 (layer 1's sets are too small to say), 507 held-out tokens, window 5: it ranks the neurons layer L + 1 newly
# needs (its own predictor's set, less the last 5 tokens') above the other uncached ones with AUC 0.961
# (shakespeare-llama-relu: 0.947), which two unit normals give when their means are sqrt(2) * Phi^-1(0.961) = 2.49
# apart; and its guesses are 1.4-3.1 times the sets its layer then asked for (mean 2.25).
LOOKAHEAD_SEPARATION = 2.49
LOOKAHEAD_SIZE = 2.25


@dataclass(frozen=True)
class TraceProfile:
    name: str
    predicted: tuple[float, ...]  # per layer of the source, fraction of d_ffn predicted per token
    new: tuple[float, ...]  # per layer of the source, fraction of d_ffn new per token against the window
    window: int
    description: str

    def at(self, layer: int, n_layers: int) -> tuple[float, float]:
        """(predicted, new) for `layer` of an `n_layers` model, by relative depth."""
        j = min(len(self.predicted) - 1, layer * len(self.predicted) // n_layers)
        return self.predicted[j], self.new[j]


PAPER_OPT_6_7B = TraceProfile(
    "paper-opt-6.7b", (0.10,), (0.024,), 5,
    "LLM in a Flash, OPT 6.7B: about 10% of the FFN predicted per token, about 2.4% new per token with a window of 5")


def embedded_profile(model: str, window: int = 5) -> TraceProfile:
    """Per-layer predicted and new fractions of an embedded model's own predictor on held-out text."""
    from flashbench import suite
    from flashbench.reference import Transformer
    from flashbench.reference.predictor import Predictor
    from flashbench.suite.models.byte_tokenizer import encode

    path = suite.model_path(model)
    transformer = Transformer.from_checkpoint(path)
    predictor = Predictor.load(path / "predictor")
    ids = encode(suite.heldout_text())[: transformer.config.max_positions]
    sets = predicted_sets(transformer, predictor, ids)  # [token][layer]
    d = transformer.config.d_ffn
    predicted, new = [], []
    for layer in range(transformer.config.n_layers):
        layer_sets = [s[layer] for s in sets]
        predicted.append(float(np.mean([len(s) for s in layer_sets]) / d))
        new.append(new_fraction(layer_sets, window, d))
    return TraceProfile(f"embedded-{model}", tuple(predicted), tuple(new), window,
                        f"measured: the {model} predictor (threshold {predictor.threshold}) on {len(ids)} held-out tokens")


def predicted_sets(model, predictor, ids: list[int]) -> list[list[np.ndarray]]:
    """The predictor's set for every token and layer, over `ids` (one forward pass)."""
    import torch

    inputs: list[torch.Tensor] = []
    hooks = [block.ffn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0][0])) for block in model.layers]
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    per_layer = [predictor.sets(layer, x) for layer, x in enumerate(inputs)]
    return [[per_layer[layer][t] for layer in range(len(per_layer))] for t in range(len(ids))]


def new_fraction(sets: list[np.ndarray], window: int, d_ffn: int) -> float:
    """Mean fraction of d_ffn per token that is in this token's set but in none of the previous `window` sets."""
    fresh = []
    for t in range(window, len(sets)):
        recent = np.unique(np.concatenate([sets[t - j] for j in range(1, window + 1)])) if window else np.zeros(0)
        fresh.append(len(np.setdiff1d(sets[t], recent)) / d_ffn)
    return float(np.mean(fresh)) if fresh else 0.0


def _draw(rng: np.random.Generator, log_weights: np.ndarray, k: int) -> np.ndarray:
    """k distinct ids drawn by weight without replacement (Gumbel top-k: one pass over the layer)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    keys = log_weights + rng.gumbel(size=len(log_weights))
    return np.argpartition(keys, -k)[-k:]


def _walk(rng: np.random.Generator, log_popularity: np.ndarray, size: int, stay: float, tokens: int) -> list[np.ndarray]:
    current = _draw(rng, log_popularity, size)
    sets = [np.sort(current)]
    for _ in range(tokens - 1):
        kept = current[rng.random(len(current)) < stay]
        weights = log_popularity.copy()
        weights[kept] = -np.inf  # refill from the neurons not kept
        current = np.concatenate([kept, _draw(rng, weights, size - len(kept))])
        sets.append(np.sort(current))
    return sets


@functools.lru_cache(maxsize=None)
def _calibrate(d_ffn: int, size: int, new: float, window: int) -> float:
    """The `stay` probability whose walk is `new` fresh per token against the window (bisection; new falls as stay
    rises). Calibrated once per target on a fixed popularity draw, then used for every layer with that target."""
    log_popularity = np.random.default_rng(0).normal(0.0, POPULARITY_SIGMA, d_ffn)
    lo, hi = 0.0, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        sets = _walk(np.random.default_rng(1), log_popularity, size, mid, CALIBRATION_TOKENS)
        lo, hi = (mid, hi) if new_fraction(sets, window, d_ffn) > new else (lo, mid)
    return (lo + hi) / 2


def layer_trace(d_ffn: int, predicted: float, new: float, window: int, tokens: int, seed: int) -> tuple[list[np.ndarray], dict]:
    """One layer's sets for `tokens` tokens, calibrated to (predicted, new); and what was achieved."""
    size = max(1, round(predicted * d_ffn))
    stay = _calibrate(d_ffn, size, new, window)
    log_popularity = np.random.default_rng(seed).normal(0.0, POPULARITY_SIGMA, d_ffn)  # log of a log-normal
    sets = _walk(np.random.default_rng(seed + 1), log_popularity, size, stay, tokens)
    return sets, {"stay": stay, "predicted_target": predicted, "new_target": new,
                  "predicted_achieved": float(np.mean([len(s) for s in sets]) / d_ffn),
                  "new_achieved": new_fraction(sets, window, d_ffn)}


@dataclass
class Trace:
    """sets[token][layer], the profile it came from, and per layer what calibration achieved."""

    sets: list[list[np.ndarray]]
    profile: TraceProfile
    layers: list[dict]
    seed: int

    def save(self, path: Path) -> None:
        """`path`.npz (the sets) and `path`.json (profile and calibration), each written atomically."""
        path = Path(path)
        flat = {f"t{t}_l{l}": s.astype(np.int32) for t, per in enumerate(self.sets) for l, s in enumerate(per)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez_compressed(tmp, **flat)
            os.replace(tmp, path.with_suffix(".npz"))
        finally:
            Path(tmp).unlink(missing_ok=True)
        meta = {"tokens": len(self.sets), "n_layers": len(self.sets[0]) if self.sets else 0, "seed": self.seed,
                "profile": asdict(self.profile), "layers": self.layers}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: Path) -> "Trace":
        path = Path(path)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            with np.load(path.with_suffix(".npz")) as z:
                sets = [[z[f"t{t}_l{l}"].astype(np.int64) for l in range(meta["n_layers"])]
                        for t in range(meta["tokens"])]
        except (OSError, KeyError, ValueError) as e:
            raise FlashbenchError(f"{path}.npz/.json: not a readable trace ({e})") from e
        p = meta["profile"]
        profile = TraceProfile(p["name"], tuple(p["predicted"]), tuple(p["new"]), p["window"], p["description"])
        return cls(sets, profile, meta["layers"], meta["seed"])


def generate(profile: TraceProfile, n_layers: int, d_ffn: int, tokens: int, seed: int = 0, progress=None) -> Trace:
    per_layer, layers = [], []
    for layer in range(n_layers):
        predicted, new = profile.at(layer, n_layers)
        sets, info = layer_trace(d_ffn, predicted, new, profile.window, tokens, seed * 7919 + layer)
        per_layer.append(sets)
        layers.append(info)
        if progress:
            progress(layer + 1, n_layers)
    return Trace([[per_layer[l][t] for l in range(n_layers)] for t in range(tokens)], profile, layers, seed)


def lookahead(sets: list[list[np.ndarray]], d_ffn: int, seed: int, separation: float = LOOKAHEAD_SEPARATION,
              size: float = LOOKAHEAD_SIZE) -> list[list[np.ndarray]]:
    """Guesses of `sets[token][layer]` as a lookahead predictor makes them one layer earlier (layer 0's: none), most
    confident first: the `size` x |set| highest scores, N(separation, 1) for the set's ids and N(0, 1) for the rest."""
    rng = np.random.default_rng(seed + 104729)
    out = []
    for per_token in sets:
        guesses = [np.zeros(0, dtype=np.int64)]
        for true in per_token[1:]:
            score = rng.standard_normal(d_ffn)
            score[true] += separation
            k = min(d_ffn, round(size * len(true)))
            top = np.argpartition(-score, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
            guesses.append(top[np.argsort(-score[top], kind="stable")].astype(np.int64))
        out.append(guesses)
    return out


def profile_named(name: str) -> TraceProfile:
    if name == PAPER_OPT_6_7B.name:
        return PAPER_OPT_6_7B
    if name.startswith("embedded-"):
        return embedded_profile(name.removeprefix("embedded-"))
    raise FlashbenchError(f"unknown trace profile {name!r}: 'paper-opt-6.7b' or 'embedded-<embedded model name>'")
