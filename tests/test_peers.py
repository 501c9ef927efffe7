"""The peers: dense mmap under a memory cgroup, and accelerate's disk offload, each in its own process."""

import os

import pytest

from flashbench.harness import peers

can_cap = pytest.mark.skipif(not (peers.CGROUP_ROOT.is_dir() and os.geteuid() == 0),
                             reason="needs root and the cgroup v1 memory controller")
PROMPT = [257, 72, 101, 108]


@can_cap
def test_mmap_peer_decodes_under_a_memory_cap(tiny_checkpoint):
    r = peers.measure_peer("mmap", tiny_checkpoint, budget=100_000, prompt=PROMPT, tokens=4, timeout_s=120)
    assert r.status == "measured", r.reason
    assert r.tokens == 3 and len(r.token_ms) == 3 and r.tokens_per_s > 0
    assert "limit" in r.cgroup and r.peak_bytes > 0


@can_cap
def test_accelerate_peer_decodes_with_disk_offload(tiny_checkpoint):
    pytest.importorskip("accelerate")
    r = peers.measure_peer("accelerate", tiny_checkpoint, budget=100_000, prompt=PROMPT, tokens=4, timeout_s=180)
    assert r.status == "measured", r.reason
    assert r.tokens == 3 and r.tokens_per_s > 0


def test_a_peer_that_fails_is_skipped_with_its_reason(tmp_path):
    r = peers.measure_peer("mmap", tmp_path / "no-checkpoint", budget=1, prompt=PROMPT, tokens=2, timeout_s=60)
    assert r.status == "skipped" and "failed" in r.reason and "config.json" in r.reason


def test_without_the_memory_controller_the_cap_is_refused_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "CGROUP_ROOT", tmp_path / "nothing")
    group, why = peers.enter_cgroup("x")
    assert group is None and "no cgroup v1 memory controller" in why
