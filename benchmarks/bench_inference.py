"""Inference speed of ViTReg against its peers at the same architecture, interleaved in one run.

Peers: transformers' `Dinov2WithRegistersModel` and timm's `vit_small_patch14_reg4_dinov2` (ViT-S/14, 4 registers),
all holding the same weights (checked: every token agrees), fp32 on the CPU. A fused-qkv vs three-projection
variant of ViTReg answers "one qkv matmul or three?" by measurement, and a variant with DINOv2's `F.interpolate`
position interpolation what the traceable resampling matrices cost; `--against REV` adds ViTReg's model code as of
git revision REV (same weights), so a change is checked for a slowdown in the same run. Achieved GFLOP/s is set
against a large matmul timed in the same run. Results are ratios: each round times every model once (in a new random
order), the per-round ratio peer / vitreg is taken, and the table gives its median and interquartile range over the
rounds. A ratio whose IQR contains 1 is a tie, and is called one.

    python benchmarks/bench_inference.py [--rounds 12] [--workloads 8x224 1x518] [--against REV] [--json out.json]
"""

import argparse
import copy
import importlib
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel
from vitreg.modeling_vitreg.modeling_vitreg import ViTRegAttention
from vitreg.training.flops import vit_forward_flops

SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, num_register_tokens=4)


def build_vitreg() -> ViTRegModel:
    """ViT-S/14 with 4 registers, DINOv2's layout and random weights."""
    config = ViTRegConfig(**SMALL, image_size=518, layerscale_value=1e-5, attn_implementation="sdpa")
    return ViTRegModel(config).eval()


def to_timm(model: ViTRegModel) -> nn.Module:
    """timm's vit_small_patch14_reg4_dinov2 holding `model`'s weights (timm folds the CLS position into the token)."""
    peer = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    sd = model.state_dict()
    pos = sd["embeddings.position_embeddings"]
    state = {
        "cls_token": sd["embeddings.cls_token"] + pos[:, :1],
        "reg_token": sd["embeddings.register_tokens"],
        "pos_embed": pos[:, 1:],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    names = {"norm1": "norm1", "attn.qkv": "attention.qkv", "attn.proj": "attention.proj", "norm2": "norm2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    for i in range(model.config.num_hidden_layers):
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                state[f"blocks.{i}.{theirs}.{kind}"] = sd[f"encoder.layer.{i}.{ours}.{kind}"]
        state[f"blocks.{i}.ls1.gamma"] = sd[f"encoder.layer.{i}.layer_scale1.lambda1"]
        state[f"blocks.{i}.ls2.gamma"] = sd[f"encoder.layer.{i}.layer_scale2.lambda1"]
    peer.load_state_dict(state, strict=True)
    return peer.eval()


def to_transformers(model: ViTRegModel) -> Dinov2WithRegistersModel:
    """transformers' Dinov2WithRegistersModel holding `model`'s weights (three q/k/v projections)."""
    config = Dinov2WithRegistersConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518,
        num_register_tokens=4, layerscale_value=1e-5, attn_implementation="sdpa",
    )  # fmt: skip
    peer = Dinov2WithRegistersModel(config).eval()
    sd = model.state_dict()
    dim = model.config.hidden_size
    with torch.no_grad():
        emb = peer.embeddings
        emb.cls_token.copy_(sd["embeddings.cls_token"])
        emb.register_tokens.copy_(sd["embeddings.register_tokens"])
        if "embeddings.mask_token" in sd:  # unused at inference; a ViTReg model has one only when asked
            emb.mask_token.copy_(sd["embeddings.mask_token"])
        emb.position_embeddings.copy_(sd["embeddings.position_embeddings"])
        emb.patch_embeddings.projection.load_state_dict(model.embeddings.patch_embeddings.projection.state_dict())
        for ours, theirs in zip(model.encoder.layer, peer.encoder.layer):
            theirs.norm1.load_state_dict(ours.norm1.state_dict())
            theirs.norm2.load_state_dict(ours.norm2.state_dict())
            for index, proj in enumerate((theirs.attention.q_proj, theirs.attention.k_proj, theirs.attention.v_proj)):
                proj.weight.copy_(ours.attention.qkv.weight[index * dim : (index + 1) * dim])
                proj.bias.copy_(ours.attention.qkv.bias[index * dim : (index + 1) * dim])
            theirs.attention.o_proj.load_state_dict(ours.attention.proj.state_dict())
            theirs.layer_scale1.lambda1.copy_(ours.layer_scale1.lambda1)
            theirs.layer_scale2.lambda1.copy_(ours.layer_scale2.lambda1)
            theirs.mlp.fc1.load_state_dict(ours.mlp.fc1.state_dict())
            theirs.mlp.fc2.load_state_dict(ours.mlp.fc2.state_dict())
        peer.layernorm.load_state_dict(model.layernorm.state_dict())
    return peer


class SplitQKVAttention(ViTRegAttention):
    """ViTRegAttention with three q/k/v projections instead of one fused matmul: the alternative being measured."""

    def __init__(self, fused: ViTRegAttention):
        super().__init__(fused.config)
        dim = fused.config.hidden_size
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        with torch.no_grad():
            for index, proj in enumerate((self.q, self.k, self.v)):
                proj.weight.copy_(fused.qkv.weight[index * dim : (index + 1) * dim])
                proj.bias.copy_(fused.qkv.bias[index * dim : (index + 1) * dim])
        self.proj = fused.proj
        del self.qkv

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        batch, seq, dim = hidden_states.shape
        heads = [p(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
                 for p in (self.q, self.k, self.v)]  # fmt: skip
        out = torch.nn.functional.scaled_dot_product_attention(*heads)  # [B, H, N, d]
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim)), None


def split_qkv(model: ViTRegModel) -> ViTRegModel:
    """A copy of `model` whose blocks use SplitQKVAttention."""
    split = copy.deepcopy(model)
    for layer in split.encoder.layer:
        layer.attention = SplitQKVAttention(layer.attention)
    return split.eval()


def interpolate_with_f_interpolate(model: ViTRegModel) -> ViTRegModel:
    """A copy of `model` whose position interpolation is DINOv2's own `F.interpolate` call (with its skip at the
    native grid) instead of the resampling matrices: what the matrices cost, measured."""
    variant = copy.deepcopy(model)
    embeddings = variant.embeddings

    def interpolate_pos_encoding(height: int, width: int) -> torch.Tensor:
        grid, rows, cols = embeddings.grid, height // 14, width // 14
        pos = embeddings.position_embeddings
        if rows * cols == grid * grid and height == width:
            return pos
        patch_pos = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(rows, cols), mode="bicubic", align_corners=False, antialias=True)
        return torch.cat((pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)), dim=1)

    embeddings.interpolate_pos_encoding = interpolate_pos_encoding
    return variant.eval()


def vitreg_at(revision: str, model: ViTRegModel) -> nn.Module:
    """`model` rebuilt from ViTReg's model code as of git `revision`, with the same weights (a regression check)."""
    repo = Path(__file__).resolve().parents[1]
    package = Path(tempfile.mkdtemp(prefix="vitreg-at-")) / "vitreg_at_revision"
    package.mkdir()
    (package / "__init__.py").write_text("")  # the modules alone: nothing registers with the Auto classes
    listed = ["git", "ls-tree", "--name-only", f"{revision}:modeling_vitreg"]
    names = subprocess.run(listed, cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    for name in (name for name in names if name.endswith(".py") and name != "__init__.py"):  # the model's modules
        show = ["git", "show", f"{revision}:modeling_vitreg/{name}"]
        (package / name).write_text(subprocess.run(show, cwd=repo, capture_output=True, text=True, check=True).stdout)
    sys.path.insert(0, str(package.parent))
    old = importlib.import_module("vitreg_at_revision.modeling_vitreg")
    config = old.ViTRegConfig(**SMALL, image_size=518, layerscale_value=1e-5, attn_implementation="sdpa")
    peer = old.ViTRegModel(config).eval()
    peer.load_state_dict(model.state_dict(), strict=True)
    return peer


def time_call(fn, repeats: int) -> float:
    """Seconds per call, the best of a short burst (after one warm-up call)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a large fp32 matmul: the machine's practical peak, measured in the same run."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = time_call(lambda: a @ b, repeats)
    return 2 * size**3 / seconds / 1e9


def workload(text: str) -> tuple[int, int]:
    """`BATCHxSIZE` (e.g. `8x224`) -> (batch, image size)."""
    batch, _, size = text.partition("x")
    return int(batch), int(size)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def verdict(q1: float, q3: float) -> str:
    """Who is faster, by the per-round ratio peer / vitreg: a tie when the IQR contains 1."""
    if q1 > 1:
        return "vitreg faster"
    if q3 < 1:
        return "peer faster"
    return "tie"


def check_same_function(peers: dict, outputs: dict, size: int) -> None:
    """Refuse to time models that do not compute the same tokens."""
    check = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        reference = outputs["vitreg"](peers["vitreg"], check)
        for name, model in peers.items():
            diff = (outputs[name](model, check) - reference).abs().max().item()
            print(f"{size}x{size}, same weights, every token: max |{name} - vitreg| = {diff:.2e}")
            if diff > 1e-4:
                raise SystemExit(f"{name} does not compute the same function (diff {diff:.2e}): benchmark invalid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds per workload")
    parser.add_argument("--repeats", type=int, default=3, help="forward passes per timing")
    parser.add_argument(
        "--workloads", type=workload, nargs="+", default=[(8, 224), (1, 518)], help="BATCHxSIZE, e.g. 8x224 1x518"
    )
    parser.add_argument("--against", metavar="REV", help="also time ViTReg's model code as of this git revision")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)

    vitreg = build_vitreg()
    peers = {
        "vitreg": vitreg,
        "vitreg (3 qkv matmuls)": split_qkv(vitreg),
        "vitreg (F.interpolate positions)": interpolate_with_f_interpolate(vitreg),
        "transformers Dinov2WithRegisters": to_transformers(vitreg),
        "timm vit_small_patch14_reg4_dinov2": to_timm(vitreg),
    }
    outputs = {
        "vitreg": lambda m, x: m(x).last_hidden_state,
        "vitreg (3 qkv matmuls)": lambda m, x: m(x).last_hidden_state,
        "vitreg (F.interpolate positions)": lambda m, x: m(x).last_hidden_state,
        "transformers Dinov2WithRegisters": lambda m, x: m(pixel_values=x).last_hidden_state,
        "timm vit_small_patch14_reg4_dinov2": lambda m, x: m.forward_features(x),
    }
    if args.against:
        peers[f"vitreg at {args.against}"] = vitreg_at(args.against, vitreg)
        outputs[f"vitreg at {args.against}"] = outputs["vitreg"]
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "runs": []}
    for batch, size in args.workloads:
        check_same_function(peers, outputs, size)
        x = torch.randn(batch, 3, size, size)
        times = {name: [] for name in peers}
        matmul = []
        with torch.inference_mode():
            for _ in range(args.rounds):
                order = list(peers)
                random.shuffle(order)  # interleaved, in a new order each round
                for name in order:
                    times[name].append(time_call(lambda n=name, x=x: outputs[n](peers[n], x), args.repeats))
                matmul.append(matmul_gflops())
        peak = statistics.median(matmul)
        flops = vit_forward_flops(vitreg.config, size) * batch
        for name in peers:
            seconds = statistics.median(times[name])
            q1, ratio, q3 = quartiles([t / base for t, base in zip(times[name], times["vitreg"])])
            results["runs"].append({
                "batch": batch, "size": size, "model": name, "ms": seconds * 1e3, "ratio_to_vitreg": ratio,
                "ratio_q1": q1, "ratio_q3": q3, "verdict": "-" if name == "vitreg" else verdict(q1, q3),
                "images_per_s": batch / seconds, "gflops": flops / seconds / 1e9,
                "fraction_of_matmul": flops / seconds / 1e9 / peak, "matmul_gflops": peak,
            })  # fmt: skip

    print(f"\nViT-S/14 reg4, fp32, CPU ({results['threads']} threads), {args.rounds} interleaved rounds; ratio = "
          "median per-round time / vitreg's [IQR]\n")  # fmt: skip
    print("| batch x size | model | ms / batch (median) | time vs vitreg [IQR] | verdict | images/s | GFLOP/s "
          "| of matmul peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        print(f"| {run['batch']} x {run['size']} | {run['model']} | {run['ms']:.1f} | {run['ratio_to_vitreg']:.3f} "
              f"[{run['ratio_q1']:.3f}, {run['ratio_q3']:.3f}] | {run['verdict']} | {run['images_per_s']:.2f} | "
              f"{run['gflops']:.1f} | {run['fraction_of_matmul']:.0%} |")  # fmt: skip
    print(f"\nlarge fp32 matmul (2048^3) in the same run: {results['runs'][0]['matmul_gflops']:.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
