"""Bicubic resampling of a learned position-embedding grid, as DINOv2's `F.interpolate` call computes it.

The resampling is linear in the embeddings: `R_rows @ P @ R_cols^T`, with one small matrix per axis computed from
the sizes by tensor arithmetic alone. One code path serves every size without a branch on the shape, so eager,
`torch.compile(dynamic=True)`, `torch.export` and ONNX run the same float32 arithmetic (no float64 in any graph).
Where PyTorch's kernel rounds once (a fused multiply-add, a float64 step), the arithmetic here is arranged so that
float32 rounds once too: the embeddings equal DINOv2's `F.interpolate` call to float32 rounding
(tests/test_position_interpolation.py). This module is numerics, not model: it imports only torch, and
modeling_vitreg.py imports it with a single dot so that `save_pretrained` ships it as remote code.
"""

from collections import OrderedDict

import torch

# Keys' cubic convolution parameter: PyTorch's bicubic resize, and PIL's bicubic filter (its antialiased kernel).
KEYS_A_RESIZE = -0.75
KEYS_A_ANTIALIAS = -0.5


def keys_cubic(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel with parameter `a` at the float32 distances `x`.

    Factored at its roots (x = 1, and x = 1, 2, 2) instead of in Horner form, whose terms cancel near them: 9e-8 from
    the exact kernel in float32, where Horner's form rounds to 1.5e-6 (and PyTorch's fused kernels to 6e-7).
    """
    x = x.abs()
    near = (x - 1) * (((a + 2) * x - 1) * x - 1)  # |x| < 1: (a + 2) x^3 - (a + 3) x^2 + 1
    far = a * (x - 1) * ((x - 2) * (x - 2))  # 1 <= |x| < 2: a (x^3 - 5 x^2 + 8 x - 4)
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def times_half_integer(step: torch.Tensor, i: torch.Tensor, minus: float) -> torch.Tensor:
    """`step * (i + 0.5) - minus` in float32 with one rounding, as the fused multiply-add PyTorch's kernels compile to.

    `step` splits into a 12-bit head and the rest, so both products with `2i + 1` (< 2^11) are exact and only the
    final sum rounds; every step is exact under any compiler's contraction too, so it holds in every graph.
    """
    exponent = torch.log2(step).floor()  # may be one off near a power of two: the head then has 11 or 13 bits
    scale = torch.exp2(11.0 - exponent)
    head = (step * scale).floor() / scale
    tail = step - head  # exact: head lies within a factor 2 below step
    odd = 2.0 * i + 1.0  # [n] exact integers
    return (head * odd * 0.5 - minus) + tail * odd * 0.5


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """`floor(x + 0.5)` without rounding `x + 0.5` to float32 first (PyTorch's kernel adds the half in float64)."""
    whole = x.floor()
    return whole + (x - whole >= 0.5).float()


def bicubic_resampling_matrix(in_size: int, out_size: int, step: torch.Tensor, antialias: bool) -> torch.Tensor:
    """`[out_size, in_size]` float32 matrix R such that `R @ x` is the bicubic resampling of `x` along one axis.

    `step` (0-d float32, on the device the matrix is built on) is the input distance between two output samples, as
    PyTorch derives it: `in / out` for a target size, `1 / scale_factor` for a scale factor. The weights are those of
    `F.interpolate(mode="bicubic", align_corners=False, antialias=antialias)`: Keys a=-0.75 on the 4 nearest inputs
    with clamped edges, or, with antialias, Keys a=-0.5 stretched over the inputs one output covers, truncated at the
    edges and renormalised (PIL's filter). Only tensor arithmetic on the sizes: traceable at symbolic sizes.
    """
    device = step.device
    j = torch.arange(in_size, device=device, dtype=torch.float32)  # input positions
    i = torch.arange(out_size, device=device, dtype=torch.float32)  # output positions
    if antialias:
        stretch = step.clamp(min=1.0)  # a downscale widens the kernel by the step
        support = 2.0 * stretch
        inverse = 1.0 / stretch
        center = times_half_integer(step, i, 0.0)  # [out]
        # The window of inputs an output reads, as PIL bounds it.
        first = round_half_up(center - support).clamp(min=0)[:, None]
        last = round_half_up(center + support).clamp(max=in_size)[:, None]
        last = torch.minimum(last, first + support.ceil() * 2 + 1)
        distance = (j[None] - center[:, None] + 0.5) * inverse  # [out, in]
        inside = (j[None] >= first) & (j[None] < last)
        weights = torch.where(inside, keys_cubic(distance, KEYS_A_ANTIALIAS), torch.zeros_like(distance))
        return weights / weights.sum(dim=1, keepdim=True)
    source = times_half_integer(step, i, 0.5)  # [out] sample points in input coordinates
    index = source.floor().clamp(max=in_size - 1)
    t = (source - index).clamp(0, 1)
    matrix = torch.zeros(out_size, in_size, device=device)
    for tap, distance in zip((-1, 0, 1, 2), (t + 1, t, 1 - t, (1 - t) + 1)):
        column = (index + tap).clamp(0, in_size - 1)  # edges repeat the border input
        weight = keys_cubic(distance, KEYS_A_RESIZE)[:, None]
        matrix = matrix + torch.where(column[:, None] == j[None], weight, torch.zeros_like(weight))
    return matrix


def offset_as_fraction(offset: float) -> tuple[int, int] | None:
    """`offset` as `(numerator, denominator)` with a power-of-ten denominator (0.1 -> (1, 10)), or None."""
    for denominator in (1, 10, 100, 1000, 10000):
        numerator = round(offset * denominator)
        if abs(numerator - offset * denominator) < 1e-9:
            return numerator, denominator
    return None


def sampling_steps(
    grid: int, rows: int, cols: int, offset: float, antialias: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input distance between output samples along rows and columns (0-d float32), as `F.interpolate` derives it.

    DINOv2 returns the trained embeddings unchanged at the native square grid, and PyTorch's antialiased kernel
    copies an axis whose size does not change: a step of 1 gives exactly that identity.
    """
    # (rows, cols) as a tensor computed in the graph, so that a traced graph keeps them symbolic.
    size = torch.stack([torch.arange(rows, device=device)[-1], torch.arange(cols, device=device)[-1]]) + 1
    size = size.float()
    fraction = offset_as_fraction(offset) if offset else (0, 1)
    if fraction is not None:
        # grid / (size + offset) as a quotient of two exact float32 integers: one rounding, as PyTorch's float64
        # `1 / scale_factor` then rounded to float32 (DINOv2 passes scale_factor=(size + offset) / grid).
        numerator, denominator = fraction
        steps = torch.full_like(size, grid * denominator) / (size * denominator + numerator)
    else:
        steps = torch.full_like(size, grid) / (size + offset)
    native = (size == grid).all()
    identity = native | (size == grid) if antialias else native
    steps = torch.where(identity, torch.ones_like(steps), steps)
    return steps[0], steps[1]


def resampling_matrices(
    grid: int, rows: int, cols: int, offset: float, antialias: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`([rows, grid], [cols, grid])` float32 matrices that resample a `grid x grid` table to `rows x cols`."""
    row_step, col_step = sampling_steps(grid, rows, cols, offset, antialias, device)
    row_matrix = bicubic_resampling_matrix(grid, rows, row_step, antialias)
    col_matrix = bicubic_resampling_matrix(grid, cols, col_step, antialias)
    return row_matrix, col_matrix


def resample_grid(table: torch.Tensor, row_matrix: torch.Tensor, col_matrix: torch.Tensor) -> torch.Tensor:
    """`[g * g, D]` row-major table -> `[rows * cols, D]` float32: columns first, then rows, as PyTorch's kernel."""
    grid, dim = col_matrix.shape[1], table.shape[-1]
    table = table.float().reshape(grid, grid, dim)
    table = torch.matmul(col_matrix, table)  # [g, cols, D]
    table = torch.matmul(row_matrix, table.reshape(grid, -1))  # [rows, cols * D]
    return table.reshape(-1, dim)  # [rows * cols, D]


class ResamplingMatrixCache:
    """The resampling matrices of the most recently used sizes, built once per size, setting and device, on it.

    A plain attribute, not a buffer: it is never saved, `model.to(...)` leaves it alone, and a model moved to another
    device builds that device's matrices on its first call there. The matrices are float32 whatever the model's dtype.
    """

    def __init__(self, grid: int, capacity: int = 32):
        self.grid, self.capacity = grid, capacity
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.builds = 0  # matrix pairs built so far (benchmarks/bench_position_host.py counts them)

    def get(
        self, rows: int, cols: int, offset: float, antialias: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`resampling_matrices(...)` of a `rows x cols` grid on `device`, built on a miss."""
        key = (rows, cols, offset, antialias, torch.device(device))
        matrices = self.entries.get(key)
        if matrices is not None:
            self.entries.move_to_end(key)
            return matrices
        # Ordinary tensors even when the first call runs under inference_mode, so that a later training step can
        # save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            matrices = resampling_matrices(self.grid, rows, cols, offset, antialias, device)
        self.builds += 1
        self.entries[key] = matrices
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)  # the least recently used
        return matrices
