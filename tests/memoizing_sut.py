"""A SUT process, written from suite/conformance/PROTOCOL.md alone as an outsider would, that memoizes
(`python tests/memoizing_sut.py MODE`): dense inference with flashbench's reference model, plus

- `prefix`: the logits it returned for every prefix, replayed when that prefix comes again (computing nothing);
- `position`: the steps of its first one-token-prefill run, replayed by step number in every later such run,
  betting that the timed run repeats the accuracy run.

It reports its replays in counters: `replayed_prefills`, `replayed_steps`."""

import json
import sys

import torch

from flashbench.reference import Engine, Transformer


def main(mode: str) -> None:
    engine, memo, prefix, behind, replayed = None, {}, (), False, {"prefill": 0, "step": 0}
    runs, first, i = 0, [], 0
    for line in sys.stdin:
        request = json.loads(line)
        op, answer = request["op"], {"id": request["id"], "ok": True}
        if op == "hello":
            answer |= {"name": f"memoizing dense SUT ({mode})", "flash": False}
        elif op == "load":
            engine, memo = Engine(Transformer.from_checkpoint(request["checkpoint"])), {}
            answer["vocab_size"] = engine.model.config.vocab_size
        elif op in ("prefill", "step"):
            if op == "prefill":
                prefix, key, i = tuple(request["tokens"]), ("prefill", tuple(request["tokens"])), 0
                runs += len(prefix) == 1
            else:
                prefix, key, i = prefix + (request["token"],), ("step", prefix + (request["token"],)), i + 1
            if mode == "position" and op == "step" and runs >= 2 and i <= len(first):
                logits = first[i - 1]
                replayed["step"] += 1
            elif mode == "prefix" and key in memo:
                logits, behind = memo[key], True
                replayed[op] += 1
            else:
                if op == "prefill":
                    logits = engine.prefill(list(prefix))
                elif behind:  # replays left the KV cache behind: catch it up
                    logits = engine.prefill(list(prefix))[-1]
                else:
                    logits = engine.step(request["token"])
                memo[key], behind = logits, False
                if mode == "position" and op == "step" and runs == 1:
                    first.append(logits)
            answer["logits"] = {"shape": list(logits.shape), "values": logits.tolist()}
        elif op == "counters":
            answer |= {"replayed_prefills": replayed["prefill"], "replayed_steps": replayed["step"]}
        print(json.dumps(answer), flush=True)
        if op == "close":
            return


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(sys.argv[1])
