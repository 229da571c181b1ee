"""Pretraining ViTs with registers on accelerate: DINOv2 self-supervised and DeiT-III-style supervised."""
