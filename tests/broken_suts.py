"""Deliberately broken SUTs, each wrong in one way that one check of `flashbench validate` must catch. The
in-process ones are served over the protocol by `python -m flashbench.harness.serve tests.broken_suts:CLASS`;
run as a script (`python tests/broken_suts.py MODE`), it breaks the protocol itself."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from flashbench.harness.adapters import ReferenceSUT, TransformersSUT
from flashbench.reference.flash import FlashEngine, Techniques


class DropsNeurons(ReferenceSUT):
    """Skips a third of each token's active neurons: less to read, and outputs that drift from dense."""

    def load(self, checkpoint, dram_budget, tolerance):
        vocab = super().load(checkpoint, dram_budget, tolerance)
        source = self.engine.shared.source
        sets = source.sets
        source.sets = lambda layer, x: [s[np.arange(len(s)) % 3 != 0] for s in sets(layer, x)]
        return vocab


class StaleLogits(ReferenceSUT):
    """Each step answers with the logits of the step before."""

    def step(self, token):
        fresh = super().step(token)
        stale, self.previous = getattr(self, "previous", fresh), fresh
        return stale


class PageCachedCopy(ReferenceSUT):
    """Copies its flash directory to tmpfs and reads that copy through the page cache, while counting and
    claiming the bytes as flash reads."""

    def load(self, checkpoint, dram_budget, tolerance):
        super().load(checkpoint, dram_budget, tolerance)
        self.copy = Path(f"/dev/shm/flashbench-broken-{os.getpid()}")
        shutil.copytree(self.engine.layout.path, self.copy)
        self.engine.close()
        self.engine = FlashEngine(self.copy, Techniques(source="oracle", window=5, threads=8, direct=False),
                                  dram_budget=dram_budget)
        return self.engine.layout.config.vocab_size

    def close(self):
        super().close()
        shutil.rmtree(self.copy, ignore_errors=True)


class DenseClaimingFlash(TransformersSUT):
    """Dense inference, every weight in DRAM, that says it reads its weights from flash."""

    def hello(self):
        return super().hello() | {"flash": True}


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
