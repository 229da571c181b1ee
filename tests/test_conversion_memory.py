"""Conversion memory: casting releases the memory-mapped source pages without changing any value; the streamed
safetensors folder is byte for byte what `save_pretrained` writes; a conversion peaks far below the checkpoint."""

import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from vitreg.conversion import (
    build_model,
    checkpoints,
    convert,
    converter,
    load_tensors,
    random_official_state_dict,
    read_source,
    write_random_checkpoint,
)
from vitreg.conversion.memory import cast_releasing, mapped_ranges, release_pages
from vitreg.conversion.streaming import Concat
from vitreg.core.errors import UserError
from vitreg.core.provenance import Provenance
from vitreg.model_cards import save_model_folder


def test_cast_releasing_keeps_every_value(tmp_path):
    source = write_random_checkpoint(tmp_path / "dinov2_vits14_reg4_pretrain.pth", hidden_size=64, num_hidden_layers=2)
    conversion, source_state = read_source(source)
    assert mapped_ranges(source), "torch.load(mmap=True) should map the checkpoint"
    expected = {key: value.clone() for key, value in conversion.state_dict.items()}
    cast = cast_releasing(conversion.state_dict, torch.bfloat16, source)
    for key, value in expected.items():
        assert cast[key].dtype == (torch.bfloat16 if value.is_floating_point() else value.dtype)
        assert torch.equal(cast[key], value.to(cast[key].dtype)), key
        # The released source pages read back from the file unchanged.
        assert torch.equal(conversion.state_dict[key], value), key
    assert all(torch.equal(v, torch.load(source, weights_only=True)[k]) for k, v in source_state.items())


def test_no_mapping_no_release(tmp_path):
    tensors = {"a": torch.randn(4096), "b": torch.arange(3)}
    cast = cast_releasing(tensors, torch.float16, None)
    assert cast["a"].dtype == torch.float16 and cast["b"] is tensors["b"]
    assert torch.equal(tensors["a"].half(), cast["a"])


def resident_bytes(path) -> int:
    """Bytes of the memory-mapped file `path` that are resident in this process (Rss of its mappings in smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) == 6 and fields[5] == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def test_casting_releases_the_mapped_source_pages(tmp_path):
    source = write_random_checkpoint(tmp_path / "dinov2_vits14_reg4_pretrain.pth", hidden_size=256, num_hidden_layers=4)
    conversion, _ = read_source(source)
    for value in conversion.state_dict.values():
        value.sum()  # touch every page: the whole mapped checkpoint is resident
    before = resident_bytes(source)
    assert before > 0.9 * source.stat().st_size
    cast = cast_releasing(conversion.state_dict, torch.float16, source)
    after = resident_bytes(source)
    # Only pages shared with a neighbour at a tensor's edge may stay; everything else went back to the file.
    assert after < 0.05 * before, (before, after)
    assert sum(v.numel() * v.element_size() for v in cast.values()) < 0.55 * source.stat().st_size


def tiny_sources(tmp_path) -> dict:
    """A DINOv2 hub file and a transformers Dinov2WithRegisters folder (whose split q/k/v convert to `Concat`s)."""
    official = write_random_checkpoint(
        tmp_path / "dinov2_vits14_reg4_pretrain.pth", hidden_size=64, num_hidden_layers=2
    )
    config = Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=256, image_size=56, patch_size=14
    )
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "hf")
    return {"official": official, "transformers": tmp_path / "hf"}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("shard_size", ["2GB", "100KB"])
@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_streamed_folder_is_what_save_pretrained_writes(tmp_path, monkeypatch, layout, shard_size, dtype):
    source = tiny_sources(tmp_path)[layout]
    monkeypatch.setattr(converter, "MAX_SHARD_SIZE", shard_size)
    streamed = convert(source, tmp_path / "streamed", dtype=dtype, progress=False)
    model = build_model(read_source(source)[0], dtype and converter.DTYPES[dtype])
    saved = save_model_folder(model, tmp_path / "saved", Provenance(kind="random"), max_shard_size=shard_size)
    names = sorted(path.name for path in saved.iterdir() if path.suffix in (".safetensors", ".json", ".py"))
    assert names == sorted(path.name for path in streamed.iterdir() if path.suffix in (".safetensors", ".json", ".py"))
    assert any(name.startswith("model-00001-of-") for name in names) == (shard_size == "100KB")
    for name in names:
        if name != "provenance.json":
            assert filecmp.cmp(saved / name, streamed / name, shallow=False), name
    expected = model.state_dict()
    tensors = load_tensors(streamed)
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], v) for k, v in expected.items())
    reloaded = AutoModel.from_pretrained(streamed)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in expected.items())


def test_concat_streams_its_parts_and_refuses_mismatched_ones(tmp_path):
    q, k = torch.randn(4, 3), torch.randn(2, 3)
    joined = Concat([q, k])
    assert joined.shape == (6, 3) and joined.ndim == 2 and torch.equal(joined.materialize(), torch.cat([q, k]))
    with pytest.raises(ValueError, match=r"\[4, 3\] float32 \+ \[2, 5\] float32"):
        Concat([q, torch.randn(2, 5)])
    hf = tiny_sources(tmp_path)["transformers"]
    state = load_tensors(hf)
    state["encoder.layer.0.attention.attention.key.weight"] = torch.randn(64, 32)
    save_file(state, hf / "model.safetensors")
    with pytest.raises(UserError, match="encoder.layer.0.attention.qkv.weight: parts"):
        read_source(hf)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_file_larger_than_memory_is_mapped_read_only(tmp_path, monkeypatch, suffix):
    expected = random_official_state_dict("dinov2_vits14_reg4", hidden_size=64, num_hidden_layers=2)
    source = tmp_path / f"dinov2_vits14_reg4_pretrain{suffix}"
    (torch.save if suffix == ".pth" else save_file)(expected, source)
    refusal = f"unable to mmap 99 bytes from file <{source}>: Cannot allocate memory (12)"  # beyond memory + swap
    load = torch.load

    def refuse_private_maps(*args, mmap=False, **kwargs):
        if mmap or suffix == ".safetensors":
            raise RuntimeError(refusal)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", refuse_private_maps)
    monkeypatch.setattr(checkpoints, "load_file", refuse_private_maps)
    conversion, source_state = read_source(source)
    assert source_state.keys() == expected.keys() and all(torch.equal(source_state[k], v) for k, v in expected.items())
    maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(str(source.resolve()))]
    assert maps and all(fields[1] == "r--p" for fields in maps)  # read-only: never charged, never written
    release_pages(source_state["blocks.0.attn.qkv.weight"], mapped_ranges(source))
    assert torch.equal(source_state["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])
    folder = convert(source, tmp_path / "out", progress=False)
    monkeypatch.undo()
    reference = build_model(read_source(source)[0]).state_dict()
    assert all(torch.equal(load_tensors(folder)[k], v) for k, v in reference.items())


PEAK = r"""
import json, resource, sys, tempfile
import torch
from vitreg import conversion
with tempfile.TemporaryDirectory() as work:  # import everything a conversion imports, lazily or not
    tiny = conversion.write_random_checkpoint(f"{work}/tiny.pth", hidden_size=64, num_hidden_layers=1)
    conversion.convert(tiny, f"{work}/tiny", progress=False)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
conversion.convert(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "baseline": baseline}))
"""


def test_conversion_peaks_under_a_quarter_of_the_checkpoint(tmp_path):
    # ~300 MB in fp32: the memory-mapped source streams out a tensor at a time (1.0x through save_pretrained).
    source = write_random_checkpoint(
        tmp_path / "dinov2_vitl14_reg4_pretrain.pth", hidden_size=1024, num_hidden_layers=6
    )
    size = source.stat().st_size
    assert size > 250e6
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", PEAK, str(source), str(tmp_path / "out")], capture_output=True, env=env)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    measured = json.loads(run.stdout.decode().splitlines()[-1])
    over = measured["peak"] - measured["baseline"]
    assert over < 0.25 * size, (over / size, measured)
    assert torch.equal(load_tensors(tmp_path / "out")["layernorm.weight"], torch.load(source, mmap=True)["norm.weight"])
