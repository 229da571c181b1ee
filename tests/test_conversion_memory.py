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
