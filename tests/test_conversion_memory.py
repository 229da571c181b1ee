"""Casting during conversion releases the memory-mapped source pages without changing any value."""

import torch

from vitreg.conversion import read_source, write_random_checkpoint
from vitreg.conversion.memory import cast_releasing, mapped_ranges


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
