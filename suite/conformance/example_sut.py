"""A minimal SUT speaking suite/conformance/PROTOCOL.md: dense inference with flashbench's reference model, the
protocol loop written out so that it can be ported to any language. It declares two switches of the technique
table, so `flashbench run` can measure its own matrix:

- quantization: the FFN weights rounded to int8, one scale per neuron, as flashbench's int8 layout stores them;
- pruning: the neurons never active on the checkpoint's shipped activation counts left out (zeroed).

    flashbench validate --sut-cmd "python suite/conformance/example_sut.py"
    flashbench run --scenario smoke --sut-cmd "python suite/conformance/example_sut.py"
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from flashbench.reference import Engine, Transformer

TECHNIQUES = ["quantization", "pruning"]


def int8(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """`weight` rounded to int8 with one symmetric scale per slice along `dim` (a neuron's row or column)."""
    scale = weight.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


def load(checkpoint: str, techniques: list[str]) -> Engine:
    model = Transformer.from_checkpoint(checkpoint)
    for layer, block in enumerate(model.layers):
        ffn = block.ffn  # up [d_ffn, d_model], gate [d_ffn, d_model] if gated, down [d_model, d_ffn]
        rows = [ffn.up.weight] + ([ffn.gate.weight] if ffn.gate is not None else [])
        if "pruning" in techniques:  # a neuron never active on the counting text contributes nothing: leave it out
            counts = load_file(str(Path(checkpoint) / "activation_counts.safetensors"))["counts"][layer]
            dead = counts == 0
            for w in rows:
                w.data[dead] = 0
            if ffn.up.bias is not None:
                ffn.up.bias.data[dead] = 0
            ffn.down.weight.data[:, dead] = 0
        if "quantization" in techniques:
            for w in rows:
                w.data = int8(w.data, dim=1)
            ffn.down.weight.data = int8(ffn.down.weight.data, dim=0)
    return Engine(model)


def main() -> None:
    engine = None
    for line in sys.stdin:
        request = json.loads(line)
        answer = {"id": request["id"], "ok": True}
        try:
            op = request["op"]
            if op == "hello":  # it holds every weight in DRAM
                answer |= {"name": "example dense SUT", "flash": False, "techniques": TECHNIQUES}
            elif op == "load":
                engine = load(request["checkpoint"], request.get("techniques", []))
                answer["vocab_size"] = engine.model.config.vocab_size
            elif op in ("prefill", "step"):
                logits = engine.prefill(request["tokens"]) if op == "prefill" else engine.step(request["token"])
                answer["logits"] = {"shape": list(logits.shape), "values": logits.tolist()}
            elif op == "counters":
                pass  # nothing to report: the harness measures what it needs from outside
            elif op != "close":
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # tell the harness, which stops and shows the error
            answer = {"id": request.get("id"), "ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
        if request.get("op") == "close":
            return


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
