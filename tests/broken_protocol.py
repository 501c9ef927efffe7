"""A SUT process that breaks the protocol (`python tests/broken_protocol.py MODE`): it answers hello and load
properly, without loading anything, then breaks on the first prefill as MODE says. Only the standard library, so
that it answers at once."""

import json
import os
import sys
import time


def broken_protocol(mode: str) -> None:
    """Answers hello and load properly (without loading anything), then breaks on the first prefill."""
    for line in sys.stdin:
        request = json.loads(line)
        answer = {"id": request["id"], "ok": True}
        if request["op"] == "hello":
            answer |= {"name": f"broken: {mode}", "flash": False}
        elif request["op"] == "load":
            answer["vocab_size"] = 259
        elif request["op"] == "prefill":
            if mode == "crash":
                print("simulated fatal error in the SUT", file=sys.stderr, flush=True)
                os._exit(3)
            if mode == "hang":
                time.sleep(3600)
            if mode == "malformed":
                print("{'logits': [0.1, 0.2", flush=True)
                continue
            n = len(request["tokens"])
            if mode == "wrong-shape":
                answer["logits"] = {"shape": [n, 100], "values": [[0.0] * 100] * n}
            elif mode == "nan":
                answer["logits"] = {"shape": [n, 259], "values": [[float("nan")] * 259] * n}
        print(json.dumps(answer), flush=True)
        if request["op"] == "close":
            return


if __name__ == "__main__":
    broken_protocol(sys.argv[1])
