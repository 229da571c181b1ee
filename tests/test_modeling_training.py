"""ViTReg under the transformers machinery: attention backends, checkpointing, stochastic depth, dtypes,
torch.compile, saving and loading."""

from contextlib import contextmanager

import pytest
import torch
from conftest import images, make_vitreg, max_diff, parity_config, randomize_, tiny_config
from transformers import AutoModel, PreTrainedModel, set_seed

from vitreg.modeling_vitreg import ViTRegBackbone, ViTRegConfig, ViTRegForImageClassification, ViTRegModel

TOL = 1e-5


def run(model, pixels, **kwargs):
    """Forward pass without autograd."""
    with torch.no_grad():
        return model(pixels, **kwargs)


def test_eager_and_sdpa_agree():
    model = make_vitreg(parity_config())
    pixels = images(32, 44)
    model.set_attn_implementation("eager")
    eager = run(model, pixels).last_hidden_state
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert max_diff(run(model, pixels).last_hidden_state, eager) <= TOL


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention"])
def test_attentions_whatever_the_implementation(implementation):
    model = make_vitreg(parity_config())
    pixels = images(32, 44)
    model.set_attn_implementation("eager")
    reference = run(model, pixels, output_attentions=True)
    model.set_attn_implementation(implementation)
    plain = run(model, pixels)  # flex attention runs on CPU for inference only
    assert max_diff(plain.last_hidden_state, reference.last_hidden_state) <= TOL
    out = run(model, pixels, output_attentions=True)
    assert len(out.attentions) == 3
    for ours, theirs in zip(out.attentions, reference.attentions):
        assert ours.shape == (2, 4, 93, 93)
        assert max_diff(ours, theirs) <= TOL


def gradients(model: torch.nn.Module, pixels: torch.Tensor, **inputs) -> dict[str, torch.Tensor]:
    """Gradients of a fixed scalar function of the model's output with respect to every parameter."""
    model.zero_grad(set_to_none=True)
    out = model(pixels, **inputs)
    if isinstance(model, ViTRegBackbone):
        loss = sum((fm * torch.linspace(-1, 1, fm.numel()).view_as(fm)).sum() for fm in out.feature_maps)
    elif isinstance(model, ViTRegForImageClassification):
        loss = out.loss
    else:
        tokens = out.last_hidden_state
        loss = (tokens * torch.linspace(-1, 1, tokens.numel()).view_as(tokens)).sum() + out.pooler_output.square().sum()
    loss.backward()
    return {name: param.grad for name, param in model.named_parameters()}


def model_and_inputs(kind: str):
    """A randomised ViTReg model, classifier or backbone and the extra inputs its training step takes."""
    config = parity_config(num_labels=3, out_features=["stage1", "stage3"], use_mask_token=True)
    mask = torch.zeros(2, 88, dtype=torch.bool)
    mask[:, ::3] = True  # the config has a mask token, which every class builds and can use
    if kind == "model":
        return randomize_(ViTRegModel(config)), {"bool_masked_pos": mask}
    if kind == "classifier":
        inputs = {"labels": torch.tensor([0, 2]), "bool_masked_pos": mask}
        return randomize_(ViTRegForImageClassification(config)), inputs
    return randomize_(ViTRegBackbone(config)), {"bool_masked_pos": mask}


@pytest.mark.parametrize("kind", ["model", "classifier", "backbone"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    model, inputs = model_and_inputs(kind)
    model.train()
    pixels = images(32, 44)
    expected = gradients(model, pixels, **inputs)
    # Every parameter learns; the mask token is one only in the bare model (masked pretraining): the classifier and
    # the backbone hold it frozen, as a buffer, though they use it.
    assert any(name.endswith("embeddings.mask_token") for name in expected) == (kind == "model")
    for name, grad in expected.items():
        assert grad is not None and grad.abs().sum() > 0, name
    calls = []
    encoder = model.vitreg.encoder if kind == "classifier" else model.encoder
    # Checkpointing wraps the block's forward: count the calls of a module inside it.
    encoder.layer[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    # transformers' three variants: default settings, reentrant and non-reentrant checkpoints.
    for use_reentrant in (None, True, False):
        settings = None if use_reentrant is None else {"use_reentrant": use_reentrant}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
        calls.clear()
        checkpointed = gradients(model, pixels, **inputs)
        assert len(calls) == 2  # forward, then the recomputation in backward
        for name, grad in expected.items():
            # Same arithmetic up to float32 summation order.
            assert max_diff(checkpointed[name], grad) <= 1e-5 * grad.abs().max(), (use_reentrant, name)
        model.gradient_checkpointing_disable()


def test_stochastic_depth_only_in_training():
    config = parity_config(drop_path_rate=0.6)
    assert [layer.drop_path.drop_prob for layer in ViTRegModel(config).encoder.layer[1:]] == [0.3, 0.6]
    model = make_vitreg(config)
    plain = ViTRegModel(parity_config())
    plain.load_state_dict(model.state_dict())
    pixels = images(32, 32, batch=8)
    eval_out = run(model, pixels).last_hidden_state
    assert torch.equal(eval_out, run(model, pixels).last_hidden_state)
    assert max_diff(eval_out, run(plain.eval(), pixels).last_hidden_state) == 0.0
    model.train()
    first, second = run(model, pixels).last_hidden_state, run(model, pixels).last_hidden_state
    assert max_diff(first, second) > 1e-3


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    drop_path = ViTRegModel(parity_config(drop_path_rate=0.5)).encoder.layer[-1].drop_path.train()
    branch = torch.ones(4000, 5, 3)
    out = drop_path(branch)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert (per_sample == per_sample[:, :1]).all()  # the whole branch of a sample at once
    assert abs(out.mean().item() - 1.0) < 0.1
    assert torch.equal(drop_path.eval()(branch), branch)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_forward_is_close_to_fp32(dtype, tolerance):
    model = make_vitreg(parity_config())
    pixels = images(32, 44)
    reference = run(model, pixels).last_hidden_state
    out = run(model.to(dtype), pixels).last_hidden_state  # fp32 pixels are cast by the patch embedding
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert max_diff(out.float(), reference) <= tolerance
    # Position interpolation happens in fp32 and is then cast, as DINOv2 does.
    interpolated = model.embeddings.interpolate_pos_encoding(16, 16)
    assert interpolated.dtype == dtype


def test_torch_compile_fullgraph_matches_eager():
    model = make_vitreg(parity_config())
    pixels = images(32, 44)
    expected = run(model, pixels)
    torch._dynamo.reset()
    # aot_eager traces forward and backward graphs like inductor but skips its C++ compilation (minutes here).
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = run(compiled, pixels)
    assert max_diff(out.last_hidden_state, expected.last_hidden_state) <= TOL
    assert max_diff(out.pooler_output, expected.pooler_output) <= TOL


@pytest.mark.benchmark
def test_torch_compile_inductor_matches_eager():
    model = make_vitreg(parity_config())
    pixels = images(32, 44)
    expected = run(model, pixels).last_hidden_state
    torch._dynamo.reset()
    assert max_diff(run(torch.compile(model), pixels).last_hidden_state, expected) <= TOL


def test_save_load_round_trip_is_exact_and_safetensors_only(tmp_path):
    config = parity_config(interpolate_offset=0.1, interpolate_antialias=False, use_swiglu_ffn=True)
    model = make_vitreg(config)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "configuration_vitreg.py",
        "model.safetensors",
        "modeling_vitreg.py",
        "position_interpolation.py",
    ]
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is ViTRegModel
    for field in ("interpolate_offset", "interpolate_antialias", "use_swiglu_ffn", "num_register_tokens"):
        assert getattr(loaded.config, field) == getattr(config, field)
    pixels = images(16, 44)
    assert torch.equal(run(loaded, pixels).last_hidden_state, run(model, pixels).last_hidden_state)


def test_dtype_round_trip(tmp_path):
    model = make_vitreg(parity_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = ViTRegModel.from_pretrained(tmp_path, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    upcast = ViTRegModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    assert torch.equal(upcast.layernorm.weight, model.layernorm.weight.float())


@contextmanager
def seeded_initialisation(seed: int = 42):
    """Reseed right before `_init_weights` runs, so that __init__ and from_pretrained draw the same numbers."""
    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        set_seed(seed)
        return original(*args, **kwargs)

    PreTrainedModel._initialize_weights = seeded
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


@pytest.mark.parametrize("model_class", [ViTRegModel, ViTRegForImageClassification, ViTRegBackbone])
def test_missing_weights_are_initialised_like_init(model_class):
    config = tiny_config(num_register_tokens=2, use_swiglu_ffn=True, use_mask_token=True)
    with seeded_initialisation():
        from_init = model_class(config)
        from_empty = model_class.from_pretrained(None, config=config, state_dict={})
    init_state, empty_state = from_init.state_dict(), from_empty.state_dict()
    assert sorted(init_state) == sorted(empty_state)
    different = [key for key, value in init_state.items() if not torch.equal(value, empty_state[key])]
    assert different == []
    embeddings = from_empty.vitreg.embeddings if model_class is ViTRegForImageClassification else from_empty.embeddings
    assert 0.01 < embeddings.position_embeddings.std() < 0.03  # initializer_range 0.02
    assert torch.equal(embeddings.mask_token, torch.zeros(1, 32))


def test_loading_with_mismatched_shapes(tmp_path):
    ViTRegForImageClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path)
    saved = ViTRegForImageClassification.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch|mismatch"):
        ViTRegForImageClassification.from_pretrained(tmp_path, num_labels=5)
    loaded = ViTRegForImageClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert loaded.classifier.weight.shape == (5, 64)
    loaded_state = loaded.vitreg.state_dict()
    assert all(torch.equal(value, loaded_state[key]) for key, value in saved.vitreg.state_dict().items())


def test_base_model_and_head_checkpoints_load_into_each_other(tmp_path):
    base = make_vitreg(parity_config())
    base.save_pretrained(tmp_path / "base")
    head = ViTRegForImageClassification.from_pretrained(tmp_path / "base", num_labels=4)
    base_state = base.state_dict()
    head_state = head.vitreg.state_dict()
    assert set(base_state) == set(head_state)  # one config, one module tree
    assert all(torch.equal(value, base_state[key]) for key, value in head_state.items())
    head.save_pretrained(tmp_path / "head")
    back = ViTRegModel.from_pretrained(tmp_path / "head")
    assert isinstance(back.config, ViTRegConfig)
    for key, value in back.state_dict().items():
        assert torch.equal(value, base_state[key]), key
