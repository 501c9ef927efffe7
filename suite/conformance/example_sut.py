"""A minimal SUT speaking suite/conformance/PROTOCOL.md: dense inference with flashbench's reference model,
the protocol loop written out so that it can be ported to any language.

    flashbench validate --sut-cmd "python suite/conformance/example_sut.py"
"""

import json
import sys

import torch

from flashbench.reference import Engine, Transformer


def main() -> None:
    engine = None
    for line in sys.stdin:
        request = json.loads(line)
        answer = {"id": request["id"], "ok": True}
        try:
            op = request["op"]
            if op == "hello":
                answer |= {"name": "example dense SUT", "flash": False}  # it holds every weight in DRAM
            elif op == "load":
                engine = Engine(Transformer.from_checkpoint(request["checkpoint"]))
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
