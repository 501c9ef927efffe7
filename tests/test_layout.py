"""Flash layout: the converter's output reads back bit for bit, and bad input or a damaged directory is refused."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashbench.reference import CheckpointError, Transformer
from flashbench.reference.layout import DTYPES, FlashLayout, LayoutError, convert, decode_records, ffn_file
from flashbench.reference.reader import FlashReader, record_buffer

ID_SETS = {"empty": [], "first": [0], "last": [255], "scattered": [255, 3, 17, 18, 19, 200, 0], "all": list(range(256))}


def expected_vectors(model: Transformer, layer: int, ids: list[int], dtype: str) -> dict[str, torch.Tensor]:
    """What the records must hold: the checkpoint's vectors in the storage dtype (int8: quantized here,
    independently of the converter: symmetric, scale = max |w| / 127 per vector)."""
    ffn = model.layers[layer].ffn
    mats = {"up": ffn.up.weight[ids], "down": ffn.down.weight[:, ids].t()}
    if ffn.gate is not None:
        mats["gate"] = ffn.gate.weight[ids]
    if dtype != "int8":
        return {k: v.to(DTYPES[dtype]).float() for k, v in mats.items()}
    out = {}
    for k, v in mats.items():
        scale = v.abs().amax(dim=1, keepdim=True) / 127
        out[k] = torch.clamp(torch.round(v / scale), -127, 127) * scale
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return Transformer.from_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
def test_records_read_back_equal_the_checkpoint_weights(tiny_checkpoint, tiny_model, tmp_path, layout, dtype):
    flash = FlashLayout.open(convert(tiny_checkpoint, tmp_path / "flash", layout, dtype).path)
    with FlashReader.for_layout(flash, threads=4) as reader:
        for layer in range(flash.config.n_layers):
            for name, ids in ID_SETS.items():
                out = record_buffer(flash.geometry, len(ids))
                stats = reader.read(layer, ids, out)
                got = decode_records(out, flash.geometry)
                want = expected_vectors(tiny_model, layer, ids, dtype)
                assert set(got) == set(want)
                for k in want:
                    assert torch.equal(got[k], want[k]), (layer, name, k)
                assert stats.records == len(ids) and stats.direct


def test_resident_part_holds_everything_but_the_ffn_matrices(tiny_checkpoint, tiny_model, tmp_path):
    flash = convert(tiny_checkpoint, tmp_path / "flash", "bundled", "float32")
    resident = flash.resident_state()
    assert not any(k.endswith(("ffn.up.weight", "ffn.down.weight", "ffn.gate.weight")) for k in resident)
    for name, tensor in resident.items():
        assert torch.equal(tensor, tiny_model.state_dict()[name]), name
    ffn_params = sum(p.numel() for n, p in tiny_model.named_parameters() if ".ffn." in n and n.endswith("weight"))
    assert sum(t.numel() for t in resident.values()) + ffn_params == sum(p.numel() for p in tiny_model.parameters())


def test_layout_json_records_geometry_checksums_and_source(tiny_checkpoint, tmp_path):
    flash = convert(tiny_checkpoint, tmp_path / "flash", "bundled", "float16")
    meta = json.loads((flash.path / "layout.json").read_text())
    assert meta["format_version"] == 2 and meta["alignment"] == 4096
    assert meta["record_bytes"] == len(flash.geometry.vectors) * 64 * 2
    assert set(meta["files"]) == {"resident.safetensors", "ffn-000.bin", "ffn-001.bin"}
    assert all(len(f["sha256"]) == 64 for f in meta["files"].values())
    assert len(meta["origin"]["sha256"]) == 64


def _checkpoint_copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_checkpoint_fails_and_leaves_no_flash_directory(tiny_checkpoint, tmp_path):
    ck = _checkpoint_copy(tiny_checkpoint, tmp_path / "ck")
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        convert(ck, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_nan_in_an_ffn_matrix_fails_the_conversion_naming_the_tensor(tiny_checkpoint, tmp_path):
    ck = _checkpoint_copy(tiny_checkpoint, tmp_path / "ck")
    tensors = load_file(str(ck / "model.safetensors"))
    name = next(n for n in tensors if n.endswith(("layers.1.fc2.weight", "layers.1.mlp.down_proj.weight")))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{name}.*NaN or Inf"):
        convert(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_directory_is_not_overwritten(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert(tiny_checkpoint, tmp_path / "out")


def test_a_layout_is_on_the_disk_before_it_appears_under_its_name(tiny_checkpoint, tmp_path, monkeypatch):
    synced, fsync = [], os.fsync

    def watched(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", watched)
    out = tmp_path / "flash"
    convert(tiny_checkpoint, out, "bundled", "float16")
    converting = {path.rsplit("/", 1)[-1] for path in synced if ".flash.converting-" in path}
    assert converting >= {p.name for p in out.iterdir()}  # every file, synced before the rename
    assert synced[-1] == str(tmp_path)  # and the rename itself


@pytest.fixture
def flash_dir(tiny_checkpoint, tmp_path):
    return convert(tiny_checkpoint, tmp_path / "flash", "bundled", "float16").path


def test_a_changed_byte_fails_the_checksum(flash_dir):
    f = flash_dir / ffn_file(1)
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LayoutError, match=r"ffn-001\.bin: checksum mismatch"):
        FlashLayout.open(flash_dir)


def test_a_truncated_ffn_file_is_refused(flash_dir):
    f = flash_dir / ffn_file(0)
    f.write_bytes(f.read_bytes()[:4096])
    with pytest.raises(LayoutError, match=r"ffn-000\.bin: 4096 bytes, layout\.json says"):
        FlashLayout.open(flash_dir, verify=False)


def test_a_wrong_format_version_is_refused(flash_dir):
    meta = json.loads((flash_dir / "layout.json").read_text())
    (flash_dir / "layout.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(LayoutError, match="format version 99"):
        FlashLayout.open(flash_dir)


def test_a_directory_without_layout_json_is_not_a_flash_directory(tmp_path):
    with pytest.raises(LayoutError, match="no layout.json"):
        FlashLayout.open(tmp_path)
