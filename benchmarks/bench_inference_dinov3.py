"""Inference speed of ViTReg's DINOv3 layout against transformers' `DINOv3ViTModel` and timm's `*_dinov3`, interleaved.

All three hold the same random weights (checked first: every token agrees), fp32 on the CPU, sdpa attention. Each
round times every model once in a new random order; the table gives the median per-round ratio peer / vitreg and its
interquartile range; a ratio whose IQR contains 1 is a tie, and is called one.

    python benchmarks/bench_inference_dinov3.py [--rounds 12] [--layouts vitb16 vits16plus] [--workloads 8x224]
"""

import argparse
import json
import platform
import random
import statistics
import sys
from pathlib import Path

import timm
import torch
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import check_same_function, quartiles, time_call, verdict, workload  # noqa: E402

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel  # noqa: E402

# name: (width, depth, heads, mlp ratio, SwiGLU, timm model) as the official hub builders set them
LAYOUTS = {
    "vitb16": (768, 12, 12, 4, False, "vit_base_patch16_dinov3_qkvb"),
    "vits16plus": (384, 12, 6, 6, True, "vit_small_plus_patch16_dinov3_qkvb"),
}


def build_vitreg(layout: str) -> ViTRegModel:
    """The DINOv3 layout `layout` as a ViTReg model with random weights (std-0.02 init, LayerScale 1e-5 raised to 0.1
    so that every block matters)."""
    width, depth, heads, ratio, swiglu, _ = LAYOUTS[layout]
    config = ViTRegConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=ratio, use_swiglu_ffn=swiglu,
        patch_size=16, image_size=224, num_register_tokens=4, layer_norm_eps=1e-5, layerscale_value=0.1,
        position_embedding_type="rope", rope_theta=100.0, rope_rescale_coords=2.0, mask_k_bias=True,
        attn_implementation="sdpa",
    )  # fmt: skip
    return ViTRegModel(config).eval()


def block_tensors(model: ViTRegModel, index: int) -> dict[str, torch.Tensor]:
    """One ViTReg block's tensors, by their ViTReg names without the block prefix."""
    prefix = f"encoder.layer.{index}."
    return {key[len(prefix) :]: value for key, value in model.state_dict().items() if key.startswith(prefix)}


def to_transformers(model: ViTRegModel) -> DINOv3ViTModel:
    """transformers' DINOv3ViTModel holding `model`'s weights (separate q/k/v, no key bias)."""
    config = model.config
    swiglu = config.use_swiglu_ffn
    peer_config = DINOv3ViTConfig(
        hidden_size=config.hidden_size, intermediate_size=config.mlp_hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_register_tokens=4, use_gated_mlp=swiglu, hidden_act="silu" if swiglu else "gelu", key_bias=False,
        layerscale_value=0.1, attn_implementation="sdpa",
    )  # fmt: skip
    peer = DINOv3ViTModel(peer_config).eval()
    sd = model.state_dict()
    state = {
        "embeddings.cls_token": sd["embeddings.cls_token"],
        "embeddings.mask_token": sd["embeddings.mask_token"][None],
        "embeddings.register_tokens": sd["embeddings.register_tokens"],
        "embeddings.patch_embeddings.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embeddings.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for index in range(config.num_hidden_layers):
        ours, theirs = block_tensors(model, index), f"model.layer.{index}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            state[theirs + name] = ours[name]
        q, k, v = ours["attention.qkv.weight"].chunk(3)
        q_bias, _, v_bias = ours["attention.qkv.bias"].chunk(3)
        state.update({theirs + "attention.q_proj.weight": q, theirs + "attention.k_proj.weight": k,
                      theirs + "attention.v_proj.weight": v, theirs + "attention.q_proj.bias": q_bias,
                      theirs + "attention.v_proj.bias": v_bias})  # fmt: skip
        state[theirs + "attention.o_proj.weight"] = ours["attention.proj.weight"]
        state[theirs + "attention.o_proj.bias"] = ours["attention.proj.bias"]
        state[theirs + "layer_scale1.lambda1"] = ours["layer_scale1.lambda1"]
        state[theirs + "layer_scale2.lambda1"] = ours["layer_scale2.lambda1"]
        for kind in ("weight", "bias"):
            if swiglu:
                gate, up = ours[f"mlp.weights_in.{kind}"].chunk(2)
                state[theirs + f"mlp.gate_proj.{kind}"], state[theirs + f"mlp.up_proj.{kind}"] = gate, up
                state[theirs + f"mlp.down_proj.{kind}"] = ours[f"mlp.weights_out.{kind}"]
            else:
                state[theirs + f"mlp.up_proj.{kind}"] = ours[f"mlp.fc1.{kind}"]
                state[theirs + f"mlp.down_proj.{kind}"] = ours[f"mlp.fc2.{kind}"]
    peer.load_state_dict(state, strict=True)
    return peer


def to_timm(model: ViTRegModel, layout: str) -> nn.Module:
    """timm's `*_dinov3_qkvb` model holding `model`'s weights (fused qkv, q and v biases, packed-apart SwiGLU)."""
    config = model.config
    peer = timm.create_model(LAYOUTS[layout][-1], pretrained=False, num_classes=0, global_pool="token")
    sd = model.state_dict()
    state = {
        "cls_token": sd["embeddings.cls_token"],
        "reg_token": sd["embeddings.register_tokens"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for index in range(config.num_hidden_layers):
        ours, theirs = block_tensors(model, index), f"blocks.{index}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.weight", "attn.proj.bias"):
            state[theirs + name] = ours[name.replace("attn.", "attention.")]
        state[theirs + "attn.qkv.weight"] = ours["attention.qkv.weight"]
        state[theirs + "attn.q_bias"], _, state[theirs + "attn.v_bias"] = ours["attention.qkv.bias"].chunk(3)
        state[theirs + "gamma_1"] = ours["layer_scale1.lambda1"]
        state[theirs + "gamma_2"] = ours["layer_scale2.lambda1"]
        for kind in ("weight", "bias"):
            if config.use_swiglu_ffn:
                gate, value = ours[f"mlp.weights_in.{kind}"].chunk(2)
                state[theirs + f"mlp.fc1_g.{kind}"], state[theirs + f"mlp.fc1_x.{kind}"] = gate, value
                state[theirs + f"mlp.fc2.{kind}"] = ours[f"mlp.weights_out.{kind}"]
            else:
                state[theirs + f"mlp.fc1.{kind}"] = ours[f"mlp.fc1.{kind}"]
                state[theirs + f"mlp.fc2.{kind}"] = ours[f"mlp.fc2.{kind}"]
    peer.load_state_dict(state, strict=True)
    return peer.eval()


def interleaved_times(peers: dict, outputs: dict, x: torch.Tensor, rounds: int, repeats: int) -> dict[str, list]:
    """Seconds per forward of every peer, one timing each per round, in a new random order every round."""
    times = {name: [] for name in peers}
    with torch.inference_mode():
        for _ in range(rounds):
            order = list(peers)
            random.shuffle(order)
            for name in order:
                times[name].append(time_call(lambda name=name: outputs[name](peers[name], x), repeats))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds per workload")
    parser.add_argument("--repeats", type=int, default=3, help="forward passes per timing")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--workloads", type=workload, nargs="+", default=[(8, 224)], help="BATCHxSIZE, e.g. 8x224")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "runs": []}
    for layout in args.layouts:
        vitreg = build_vitreg(layout)
        timm_name = f"timm {LAYOUTS[layout][-1]}"
        peers = {
            "vitreg": vitreg,
            "transformers DINOv3ViTModel": to_transformers(vitreg),
            timm_name: to_timm(vitreg, layout),
        }
        outputs = {
            "vitreg": lambda m, x: m(x).last_hidden_state,
            "transformers DINOv3ViTModel": lambda m, x: m(pixel_values=x).last_hidden_state,
            timm_name: lambda m, x: m.forward_features(x),
        }
        for batch, size in args.workloads:
            check_same_function(peers, outputs, size)
            times = interleaved_times(peers, outputs, torch.randn(batch, 3, size, size), args.rounds, args.repeats)
            for name in peers:
                q1, ratio, q3 = quartiles([t / base for t, base in zip(times[name], times["vitreg"])])
                results["runs"].append({
                    "layout": layout, "batch": batch, "size": size, "model": name,
                    "ms": statistics.median(times[name]) * 1e3, "ratio_to_vitreg": ratio, "ratio_q1": q1,
                    "ratio_q3": q3, "verdict": "-" if name == "vitreg" else verdict(q1, q3),
                })  # fmt: skip
    print(f"\nDINOv3 layouts, fp32, CPU ({results['threads']} threads), {args.rounds} interleaved rounds; "
          "ratio = median per-round time / vitreg's [IQR]\n")  # fmt: skip
    print("| layout | batch x size | model | ms / batch (median) | time vs vitreg [IQR] | verdict |")
    print("|---|---|---|---|---|---|")
    for run in results["runs"]:
        print(f"| {run['layout']} | {run['batch']} x {run['size']} | {run['model']} | {run['ms']:.1f} | "
              f"{run['ratio_to_vitreg']:.3f} [{run['ratio_q1']:.3f}, {run['ratio_q3']:.3f}] | {run['verdict']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
