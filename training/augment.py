"""Image augmentations: DINOv2 multi-crop and DeiT III's 3-Augment, on PIL images with torchvision v2."""

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from vitreg.core.images import IMAGENET_MEAN, IMAGENET_STD

BICUBIC = InterpolationMode.BICUBIC


def to_normalized_tensor() -> T.Compose:
    """PIL image -> float `[3, H, W]` normalised with the ImageNet statistics."""
    return T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def color_distortion() -> T.Compose:
    """DINOv2's flip, colour jitter (p 0.8) and grayscale (p 0.2)."""
    return T.Compose(
        [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
    )


class PILGaussianBlur(T.Transform):
    """DeiT III's blur (3-Augment): PIL's Gaussian blur with a radius uniform in [0.1, 2]."""

    def __init__(self, radius: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        self.radius = radius

    def forward(self, image: Image.Image) -> Image.Image:
        radius = self.radius[0] + (self.radius[1] - self.radius[0]) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


# Blur probabilities of (global crop 1, global crop 2, local crops). DINOv2's `GaussianBlur(p)` hands torchvision's
# RandomApply `1 - p`, so its code (and the released checkpoints) blur with 0 / 0.9 / 0.5; its paper says 1 / 0.1 / 0.5.
BLUR_PROBABILITIES = {"official_code": (0.0, 0.9, 0.5), "paper": (1.0, 0.1, 0.5)}


def gaussian_blur(p: float) -> T.RandomApply:
    """DINOv2's Gaussian blur (torchvision's, 9 px kernel, sigma uniform in [0.1, 2]) applied with probability `p`."""
    return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


class MultiCrop:
    """DINOv2 multi-crop: 2 global crops (blur on the first, blur/solarize on the second) and N local crops."""

    def __init__(
        self,
        global_size: int,
        global_scale: tuple[float, float],
        local_number: int,
        local_size: int,
        local_scale: tuple[float, float],
        blur_convention: str = "official_code",
    ):
        self.local_number = local_number
        blur_1, blur_2, blur_local = BLUR_PROBABILITIES[blur_convention]
        global_crop = T.RandomResizedCrop(global_size, scale=global_scale, interpolation=BICUBIC, antialias=True)
        local_crop = T.RandomResizedCrop(local_size, scale=local_scale, interpolation=BICUBIC, antialias=True)
        normalize = to_normalized_tensor()
        self.global_1 = T.Compose([global_crop, color_distortion(), gaussian_blur(blur_1), normalize])
        self.global_2 = T.Compose(
            [global_crop, color_distortion(), gaussian_blur(blur_2), T.RandomSolarize(128, p=0.2), normalize]
        )
        self.local = T.Compose([local_crop, color_distortion(), gaussian_blur(blur_local), normalize])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        global_crops = torch.stack([self.global_1(image), self.global_2(image)])  # [2, 3, G, G]
        local_crops = [self.local(image) for _ in range(self.local_number)]
        return {
            "global_crops": global_crops,
            "local_crops": torch.stack(local_crops) if local_crops else global_crops.new_zeros(0, 3, 1, 1),
        }


class ThreeAugment:
    """DeiT III's 3-Augment: random resized crop, flip, one of grayscale / solarize / blur, colour jitter."""

    def __init__(self, size: int, scale: tuple[float, float], color_jitter: float, three_augment: bool = True):
        steps = [
            T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
            T.RandomHorizontalFlip(),
        ]
        if three_augment:
            steps.append(T.RandomChoice([T.RandomGrayscale(p=1.0), T.RandomSolarize(128, p=1.0), PILGaussianBlur()]))
        if color_jitter:
            steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        self.transform = T.Compose([*steps, to_normalized_tensor()])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.transform(image)}  # [3, S, S]
