"""Deliberately broken SUTs, each wrong in one way that one check of `flashbench validate` must catch, served over
the protocol by `python -m flashbench.harness.serve tests.broken_suts:CLASS`. Those that break the protocol
itself are in tests/broken_protocol.py."""

import os
import shutil
from pathlib import Path

import numpy as np
import torch

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


class IgnoresBudget(ReferenceSUT):
    """Keeps a 'prefetch buffer' of 256 MiB beyond its DRAM budget."""

    def load(self, checkpoint, dram_budget, tolerance):
        vocab = super().load(checkpoint, dram_budget, tolerance)
        self.prefetch = torch.ones((dram_budget + (256 << 20)) // 4)  # every page touched
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
