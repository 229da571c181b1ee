"""Inference speed of ViTReg's DINOv3 layout against transformers' `DINOv3ViTModel` and timm's `*_dinov3`, interleaved.

All three hold the same random weights, carried between the layouts by ViTReg's converters and timm's own checkpoint
filter (checked first: every token agrees), fp32 on the CPU, sdpa attention. Each round times every model once in a
new random order; the table gives the median per-round ratio peer / vitreg and its interquartile range; a ratio whose
IQR contains 1 is a tie, and is called one.

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
from timm.models import eva
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import check_same_function, quartiles, time_call, verdict, workload  # noqa: E402

from vitreg.conversion import build_model, to_dinov3  # noqa: E402
from vitreg.conversion.dinov3 import convert_dinov3_transformers  # noqa: E402

# name: (width, depth, heads, mlp ratio, SwiGLU, timm model) as the official hub builders set them
LAYOUTS = {
    "vitb16": (768, 12, 12, 4, False, "vit_base_patch16_dinov3_qkvb"),
    "vits16plus": (384, 12, 6, 6, True, "vit_small_plus_patch16_dinov3_qkvb"),
}


def build_peers(layout: str) -> dict[str, nn.Module]:
    """ViTReg, transformers and timm holding the same random weights, moved between the layouts by ViTReg's own
    converters (transformers -> ViTReg) and export (ViTReg -> the official layout), then timm's own checkpoint filter
    (official -> timm). LayerScale starts at 0.1 instead of 1e-5 so that every block matters."""
    width, depth, heads, ratio, swiglu, timm_name = LAYOUTS[layout]
    hidden = int(width * ratio * 2 / 3) if swiglu else width * ratio  # DINOv3's SwiGLU width (aligned already)
    peer_config = DINOv3ViTConfig(
        hidden_size=width, intermediate_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
        num_register_tokens=4, use_gated_mlp=swiglu, hidden_act="silu" if swiglu else "gelu", key_bias=False,
        layerscale_value=0.1, attn_implementation="sdpa",
    )  # fmt: skip
    transformers_model = DINOv3ViTModel(peer_config).eval()
    conversion = convert_dinov3_transformers(transformers_model.state_dict(), peer_config.to_dict())
    vitreg = build_model(conversion)
    vitreg.set_attn_implementation("sdpa")
    timm_model = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="token").eval()
    official = to_dinov3(vitreg.state_dict(), vitreg.config)
    timm_model.load_state_dict(eva.checkpoint_filter_fn(official, timm_model), strict=True)
    return {"vitreg": vitreg, "transformers DINOv3ViTModel": transformers_model, f"timm {timm_name}": timm_model}


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
        peers = build_peers(layout)
        timm_name = f"timm {LAYOUTS[layout][-1]}"
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
