"""Deliberately broken SUTs, each wrong in one way that one check of `flashbench validate` must catch, served over
the protocol by `python -m flashbench.harness.serve tests.broken_suts:CLASS`. Those that break the protocol
itself are in tests/broken_protocol.py; one that memoizes, written from PROTOCOL.md alone, is
tests/memoizing_sut.py."""

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from flashbench.harness.adapters import ReferenceSUT, TransformersSUT
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import FlashLayout
from flashbench.reference.reader import FlashReader, aligned_buffer


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
        self.copy_of, self.copy = self.engine.layout.path, Path(f"/dev/shm/flashbench-broken-{os.getpid()}")
        shutil.copytree(self.copy_of, self.copy)
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


class Memoizes(ReferenceSUT):
    """Remembers the logits it returned for every prefix and replays them when the same prefix comes again,
    computing and reading nothing (it counts these replays, of prefills and of steps, in its counters). Where a
    prefix is new it computes honestly, catching its KV cache up first if replays left it behind."""

    def load(self, checkpoint, dram_budget, tolerance):
        self.memo, self.prefix, self.behind = {}, (), False
        self.replayed = {"prefill": 0, "step": 0}
        return super().load(checkpoint, dram_budget, tolerance)

    def _answer(self, op: str, compute):
        key = (op, self.prefix)
        if key in self.memo:
            self.replayed[op] += 1
            self.behind = True  # the engine's KV cache did not follow
            return self.memo[key]
        self.memo[key], self.behind = compute(), False
        return self.memo[key]

    def prefill(self, tokens):
        self.prefix = tuple(tokens)
        return self._answer("prefill", lambda: super(Memoizes, self).prefill(tokens))

    def step(self, token):
        behind, self.prefix = self.behind, self.prefix + (token,)
        compute = ((lambda: super(Memoizes, self).prefill(list(self.prefix))[-1]) if behind
                   else (lambda: super(Memoizes, self).step(token)))
        return self._answer("step", compute)

    def counters(self):
        return super().counters() | {"replayed_prefills": self.replayed["prefill"],
                                     "replayed_steps": self.replayed["step"]}


class ReplaysByPosition(ReferenceSUT):
    """Bets that the timed run repeats the accuracy run: it keeps the logits of the first teacher-forced run (a
    one-token prefill and its steps) and, in every later one, answers step i with the first run's step i without
    looking at the tokens, computing and reading nothing."""

    def load(self, checkpoint, dram_budget, tolerance):
        self.runs, self.first, self.i, self.replayed = 0, [], 0, 0
        return super().load(checkpoint, dram_budget, tolerance)

    def prefill(self, tokens):
        if len(tokens) == 1:
            self.runs, self.i = self.runs + 1, 0
        return super().prefill(tokens)

    def step(self, token):
        self.i += 1
        if self.runs >= 2 and self.i <= len(self.first):
            self.replayed += 1
            return self.first[self.i - 1]
        logits = super().step(token)
        if self.runs == 1:
            self.first.append(logits)
        return logits

    def counters(self):
        return super().counters() | {"replayed_steps": self.replayed}


class OverClaims(ReferenceSUT):
    """Reads from flash honestly but reports twice the bytes it read."""

    def counters(self):
        counters = super().counters()
        return counters | {"bytes_read": 2 * counters["bytes_read"]}


class ReadsBeforeTheTimedRun(PageCachedCopy):
    """Serves its weights from a page-cached copy in tmpfs, like PageCachedCopy, but reads the original flash files
    from storage (direct, unclaimed) four times over on its first decode step: over the whole connection storage
    served more than it claims, while the timed run read nothing from storage."""

    def load(self, checkpoint, dram_budget, tolerance):
        vocab = super().load(checkpoint, dram_budget, tolerance)
        self.original = FlashReader.for_layout(FlashLayout.open(self.copy_of), threads=4)
        self.warmed = False
        return vocab

    def step(self, token):
        if not self.warmed:
            layout = self.original.geometries
            for _ in range(4):
                for layer, g in enumerate(layout):
                    self.original.read_layer(layer, aligned_buffer(g.file_bytes))
            self.warmed = True
        return super().step(token)

    def close(self):
        self.original.close()
        super().close()


class RaisesInStep(ReferenceSUT):
    """Fails inside a call, as an in-process engine with a bug would."""

    def step(self, token):
        raise RuntimeError("out of neurons")


class DeclaresAnUnknownTechnique(TransformersSUT):
    def hello(self):
        return super().hello() | {"techniques": ["quantization", "teleportation"]}


class FailsWhenQuantized(TransformersSUT):
    """Declares quantization, then cannot do it."""

    def hello(self):
        return super().hello() | {"techniques": ["quantization"]}

    def load(self, checkpoint, dram_budget, tolerance, techniques=(), settings=None):
        if "quantization" in techniques:
            raise RuntimeError("int8 kernels not built")
        return super().load(checkpoint, dram_budget, tolerance)
