"""Text becomes tokens with the checkpoint's own tokenizer, in every command; a checkpoint without one is refused."""

import json
import shutil

import pytest

from flashbench import suite
from flashbench.harness.agreement import heldout_sequences
from flashbench.harness.cli import main
from flashbench.reference import ModelConfig
from flashbench.reference.errors import CheckpointError
from flashbench.reference.tokenizer import Tokenizer
from flashbench.suite.models import byte_tokenizer
from tests.families import bpe_tokenizer, write_family_checkpoint

SONNET = "Shall I compare thee"


@pytest.fixture(scope="module")
def bpe_opt(tmp_path_factory):
    """An OPT checkpoint with a BPE tokenizer.json of its own (BOS `</s>` first, as OPT's)."""
    return write_family_checkpoint("opt", tmp_path_factory.mktemp("bpe-opt") / "ckpt")


def tokenizer_of(path) -> Tokenizer:
    return Tokenizer.load(path, ModelConfig.load(path))


@pytest.mark.parametrize("name", suite.EMBEDDED_MODELS)
def test_the_embedded_models_declare_their_byte_tokenizer_in_tokenizer_json(name):
    tok = tokenizer_of(suite.model_path(name))
    text = suite.heldout_text()
    assert tok.encode(text, bos=False) == list(text.encode("utf-8"))
    assert tok.encode("ab") == [byte_tokenizer.BOS, 97, 98] and tok.eos == byte_tokenizer.EOS
    assert tok.decode(tok.encode(text)) == text


def test_transformers_reads_the_embedded_tokenizer_to_the_same_ids():
    transformers = pytest.importorskip("transformers")
    path = suite.model_path(suite.DEFAULT_MODEL)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    text = suite.heldout_text()[:2000]
    assert theirs(text)["input_ids"] == tokenizer_of(path).encode(text)


def test_generate_prefills_the_checkpoints_own_token_count_and_decodes_its_text(bpe_opt, tmp_path, capsys):
    tok = tokenizer_of(bpe_opt)
    assert len(tok.encode(SONNET)) <= len(SONNET) // 2, "the BPE tokenizer should merge bytes"
    out = tmp_path / "gen.json"
    assert main(["generate", str(bpe_opt), "--prompt", SONNET, "--tokens", "6", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["prefill_tokens"] == len(tok.encode(SONNET))
    assert rec["text"] == tok.decode(rec["tokens"]) and "tokenizer.json" in rec["tokenizer"]


def test_a_tokenizer_without_bos_starts_sequences_with_the_text():
    tok = bpe_tokenizer(bos=None, eos="<|endoftext|>")
    ids = tok.encode("To be, or not to be", add_special_tokens=False).ids
    teacher_forced, prompt = heldout_sequences(ids, None, 4, greedy_prompt=2)
    assert teacher_forced == ids[:4] and prompt == ids[4:6]


def test_a_checkpoint_without_tokenizer_files_exits_2_naming_what_is_missing(bpe_opt, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(bpe_opt, bare)
    (bare / "tokenizer.json").unlink()
    assert main(["generate", str(bare), "--tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{bare}: no tokenizer (tokenizer.json or tokenizer.model or vocab.json + merges.txt)" in err


def test_a_tokenizer_json_that_does_not_parse_exits_2_naming_it(bpe_opt, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(bpe_opt, broken)
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    assert main(["check-dense", str(broken)]) == 2
    assert f"{broken / 'tokenizer.json'}: not a tokenizer the tokenizers package can read" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_models_embedding_is_refused(bpe_opt, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(bpe_opt, small)
    bpe_tokenizer("</s>", "</s>", vocab_size=600).save(str(small / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer.json: the tokenizer has 600 tokens but the model's "
                                              r"embedding only 520 rows"):
        tokenizer_of(small)


def test_a_checkpoint_with_only_vocab_and_merges_is_read_through_transformers(bpe_opt, tmp_path):
    pytest.importorskip("transformers")
    slow = tmp_path / "slow"
    shutil.copytree(bpe_opt, slow)
    (slow / "tokenizer.json").unlink()
    bpe_tokenizer("</s>", "</s>").model.save(str(slow))  # vocab.json + merges.txt, as GPT-2-style repositories ship
    converted = tokenizer_of(slow)
    assert converted.source == slow
    assert converted.encode(SONNET, bos=False) == tokenizer_of(bpe_opt).encode(SONNET, bos=False)
