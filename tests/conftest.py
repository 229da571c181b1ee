"""Shared fixtures: everything offline, tiny configs, real photos shipped by scikit-image."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

import vitreg.modeling_vitreg  # noqa: E402,F401  (registers the Auto classes)
from vitreg.conversion.reference import timm_model  # noqa: E402
from vitreg.core.images import sample_images  # noqa: E402
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel  # noqa: E402


def tiny_config(**overrides) -> ViTRegConfig:
    """A 2-block, 32-wide ViTReg on 28 px images (2x2 grid of 14 px patches): fast everywhere."""
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        num_register_tokens=4,
        layerscale_value=0.5,
    )
    fields.update(overrides)
    return ViTRegConfig(**fields)


@pytest.fixture
def config() -> ViTRegConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photographs that scikit-image ships (no download)."""
    return sample_images(("astronaut", "chelsea", "coffee", "rocket"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons; a test that built an Accelerator must not hand its
    state to the next one."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


# Shared by the model, parity, training and pipeline tests.


def parity_config(**overrides) -> ViTRegConfig:
    """A 3-block ViTReg with an 8x8 position grid, so that interpolation has room to matter."""
    return tiny_config(**{"patch_size": 4, "image_size": 32, "num_hidden_layers": 3, **overrides})


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter non-trivial values (tokens, norms and layer scales included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_scale = name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1"))
            param.copy_(1.0 + 0.2 * noise if is_scale else 0.15 * noise)
    return model.eval()


def make_vitreg(config: ViTRegConfig, seed: int = 0) -> ViTRegModel:
    """A ViTRegModel in eval mode with random, non-trivial weights."""
    return randomize_(ViTRegModel(config), seed)


def to_timm_state_dict(model: ViTRegModel) -> dict[str, torch.Tensor]:
    """Map ViTReg weights onto timm's VisionTransformer(no_embed_class=True) names."""
    config = model.config
    state = model.state_dict()
    pos = state.pop("embeddings.position_embeddings")
    num_cls_positions = model.embeddings.num_cls_positions
    out = {"pos_embed": pos[:, num_cls_positions:]}
    if config.use_cls_token:
        # timm folds the CLS position into the token itself.
        out["cls_token"] = state.pop("embeddings.cls_token") + pos[:, :num_cls_positions].sum(1, keepdim=True)
    if config.num_register_tokens:
        out["reg_token"] = state.pop("embeddings.register_tokens")
    state.pop("embeddings.mask_token", None)
    renames = [
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.qkv\.", r"blocks.\1.attn.qkv."),
        (r"^encoder\.layer\.(\d+)\.attention\.proj\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^encoder\.layer\.(\d+)\.mlp\.(fc\d|weights_in|weights_out)\.", r"blocks.\1.mlp.\2."),
        (r"^encoder\.layer\.(\d+)\.(norm\d)\.", r"blocks.\1.\2."),
        (r"^layernorm\.", "fc_norm." if config.use_fc_norm else "norm."),
    ]
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        key = key.replace("mlp.weights_in.", "mlp.fc1.").replace("mlp.weights_out.", "mlp.fc2.")
        out[key] = value
    return out


def make_timm(model: ViTRegModel) -> nn.Module:
    """timm's VisionTransformer with the same architecture and weights as `model` (CLS position folded in)."""
    reference = timm_model(model.config, no_embed_class=True)
    reference.load_state_dict(to_timm_state_dict(model), strict=True)
    return reference.eval()


def images(height: int, width: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """A reproducible batch of random `[B, 3, height, width]` images."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two same-shaped tensors (0 for empty ones)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def spawn_launcher(function, args: tuple = (), num_processes: int = 2) -> None:
    """accelerate's `debug_launcher` (N CPU processes over gloo), but with spawned processes: a forked child inherits
    the test process's OpenMP thread pool and can hang in its first parallel region. `function` must be importable."""
    import tempfile

    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with (
        tempfile.NamedTemporaryFile() as rendezvous,
        patch_environment(
            world_size=num_processes,
            master_addr="127.0.0.1",
            master_port="29500",
            accelerate_mixed_precision="no",
            accelerate_debug_rdv_file=rendezvous.name,
            accelerate_use_cpu="yes",
            gloo_socket_ifname="lo",
        ),
    ):
        start_processes(PrepareForLaunch(function, debug=True), args=args, nprocs=num_processes, start_method="spawn")
