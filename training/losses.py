"""DINOv2's losses: DINO cross-entropy on CLS, iBOT on masked patches, centering or Sinkhorn-Knopp targets, KoLeo.

Each computes what the official code (facebookresearch/dinov2, `dinov2/loss` composed by `train/ssl_meta_arch.py`)
computes; tests/test_official_dinov2.py checks them against it. Targets and losses run in float32; statistics over
the batch are all-reduced so every process sees the global batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets `[N, K]` whose columns (prototypes) are used equally over the global batch; rows sum to 1."""
    q = torch.exp(logits.float() / temperature).t()  # [K, N]
    num_prototypes = q.shape[0]
    num_samples = all_reduce_sum(torch.tensor(q.shape[1], device=q.device, dtype=torch.float32))
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype gets total mass 1/K ...
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)  # ... each sample total mass 1/N
        q /= num_samples
    return (q * num_samples).t()  # [N, K]


class TeacherTargets(nn.Module):
    """Turns teacher scores into target distributions: softmax around an EMA center, or Sinkhorn-Knopp.

    The center follows DINOv2: for the DINO loss it averages all rows of the global batch; for the iBOT loss
    (`per_process_mean=True`) each process averages its own masked patches and the center update is the mean of
    those per-process means, whatever the number of patches each process masked.
    """

    def __init__(
        self,
        num_prototypes: int,
        method: str = "centering",
        center_momentum: float = 0.9,
        iterations: int = 3,
        per_process_mean: bool = False,
    ):
        super().__init__()
        self.method, self.center_momentum, self.iterations = method, center_momentum, iterations
        self.per_process_mean = per_process_mean
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """`[N, K]` teacher scores -> `[N, K]` targets; updates the center (all-reduced) after using it."""
        logits = logits.float()
        if self.method == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.iterations)
        targets = F.softmax((logits - self.center) / temperature, dim=-1)
        self.update_center(logits)
        return targets

    @torch.no_grad()
    def update_center(self, logits: torch.Tensor) -> None:
        """EMA of the batch mean of the teacher scores (over rows, or over per-process means)."""
        rows = logits.shape[0]
        if self.per_process_mean:
            # A process without a masked patch (the official code would average an empty tensor into NaN) adds
            # nothing and is not counted; when no process has one, the center stays as it is.
            total = logits.mean(dim=0, keepdim=True) if rows else logits.new_zeros(self.center.shape)
            count = torch.tensor(float(rows > 0), device=logits.device)
        else:
            total, count = logits.sum(dim=0, keepdim=True), torch.tensor(float(rows), device=logits.device)
        total, count = all_reduce_sum(total), all_reduce_sum(count)
        updated = self.center * self.center_momentum + total / count.clamp(min=1) * (1 - self.center_momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))


def cross_entropy(targets: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row `-sum(targets * log_softmax(student / temp))`: `[N, K]`, `[N, K]` -> `[N]`."""
    return -(targets * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


def dino_loss(
    student_views: list[torch.Tensor], teacher_targets: list[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """Cross-entropy of every (teacher global view, other student view) pair, each a mean over `[B, K]` rows.

    Student views list the global crops first, in the teacher's order: a teacher view never supervises itself.
    As in DINOv2 the sum of the pair means is divided by `G(G - 1) + max(G * L, 1)` for G global and L local views:
    the number of pairs, except that without local crops it is 3, not 2.
    """
    num_global, num_local = len(teacher_targets), len(student_views) - len(teacher_targets)
    terms = [
        cross_entropy(targets, student, student_temp).mean()
        for t, targets in enumerate(teacher_targets)
        for s, student in enumerate(student_views)
        if s != t
    ]
    return torch.stack(terms).sum() / (num_global * (num_global - 1) + max(num_global * num_local, 1))


def ibot_loss(
    student_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT: cross-entropy on the masked patches `[M, K]`, averaged within each image, summed, then divided by the
    number of all global-crop images, masked or not (DINOv2's `forward_masked`).

    `masks` is the `[N_images, HW]` mask the `M` rows were gathered with (row-major order).
    """
    per_image = masks.sum(dim=1)  # [N_images]
    weights = (1.0 / per_image.clamp(min=1).float()).repeat_interleave(per_image)  # [M]: 1 / its image's masked
    return (cross_entropy(teacher_targets, student_logits, student_temp) * weights).sum() / masks.shape[0]


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser: `-mean(log(distance to the nearest neighbour))` of L2-normed rows."""
    features = F.normalize(features.float(), dim=-1, eps=eps)  # [B, D]
    with torch.no_grad():
        similarity = features @ features.t()
        similarity.fill_diagonal_(-2.0)  # never one's own neighbour
        neighbours = similarity.argmax(dim=1)
    distances = F.pairwise_distance(features, features[neighbours], eps=eps)  # [B]
    return -torch.log(distances + eps).mean()
