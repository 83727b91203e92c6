"""DCGAN generator and discriminator (Radford et al. 2016) with the LSRO settings (docs/protocol.md, "DCGAN").

Paper configuration at 128×128: z (100-d, Uniform[-1, 1]) -> Linear to 4×4×1024 -> 5 stride-2 5×5 deconvs
(1024->512->256->128->64->64, BN+ReLU) -> 5×5 stride-1 deconv to 3 channels -> tanh; D mirrors it with 5
stride-2 5×5 convs (64..1024, LeakyReLU 0.2, BN except the first) -> Linear to one logit.

``gan.arch=lsro`` is the generator of layumi/Person-reID_GAN@6621e2c (``DCGAN/model.py:302-331``), which drew
LSRO's pool: the same projection and stride-2 stages, except that the last stride-2 deconv outputs the 3 colour
channels, followed by BatchNorm + ReLU on that 3-channel map, then a 5×5 stride-1 deconv 3->3 and tanh; every layer
has a bias (``ops.linear`` / ``ops.deconv2d``), 6 BatchNorm layers at 128×128. Its D equals ours at 128×128.

Sizes: the number of stride-2 stages n is derived from ``gan.image_size`` (H, W): the larger side must be 4·2^n
(n >= 1) and the smaller equal to it or half of it, so the seed map is 4×4, 4×2 or 2×4. Examples: (128, 128),
(64, 64), (128, 64), (64, 32), (32, 32). Channel widths run base_width·2^(n-1) down to base_width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_EXAMPLES = ((128, 128), (64, 64), (128, 64), (64, 32), (32, 32))
SIZE_RULE = "larger side = 4*2^n (n >= 1), smaller side = larger or larger/2"


def stage_plan(size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(number of stride-2 stages n, seed map (h0, w0)) for an image size, or ValueError naming gan.image_size."""
    error = ValueError(f"gan.image_size must satisfy: {SIZE_RULE}; e.g. {list(SUPPORTED_EXAMPLES)}; got {size!r}")
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise error from None
    big, small = max(h, w), min(h, w)
    n = big.bit_length() - 3  # big = 4 * 2^n  <=>  big = 2^(n+2)
    if small < 1 or n < 1 or big != 4 << n or small not in (big, big // 2):
        raise error
    return n, (h >> n, w >> n)


def _check_kernel(kernel_size: int) -> None:
    if kernel_size not in (4, 5):
        raise ValueError(f"the DCGAN's kernel_size must be 4 or 5, got {kernel_size!r}")


def _widths(base_width: int, n: int) -> list[int]:
    if base_width < 1:
        raise ValueError(f"gan.g_width / gan.d_width must be >= 1, got {base_width!r}")
    return [base_width * 2 ** (n - 1 - k) for k in range(n)]  # e.g. [1024, 512, 256, 128, 64]


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN init: conv/linear weights ~ N(0, 0.02), BN weights ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z [B, latent_dim] -> image [B, 3, H, W] in [-1, 1]."""

    def __init__(
        self,
        latent_dim: int = 100,
        out_size: tuple[int, int] = (128, 128),
        base_width: int = 64,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"gan.latent_dim must be >= 1, got {latent_dim!r}")
        _check_kernel(kernel_size)
        n, (h0, w0) = stage_plan(out_size)
        widths = _widths(base_width, n)
        self.latent_dim, self.out_size, self.seed_shape = latent_dim, tuple(out_size), (widths[0], h0, w0)
        self.project = nn.Linear(latent_dim, widths[0] * h0 * w0, bias=False)
        self.project_bn = nn.BatchNorm2d(widths[0])
        pad, out_pad = (2, 1) if kernel_size == 5 else (1, 0)  # both give an exact 2x upsampling
        layers: list[nn.Module] = []
        for k in range(n):
            c_in, c_out = widths[k], widths[min(k + 1, n - 1)]
            layers += [
                nn.ConvTranspose2d(c_in, c_out, kernel_size, 2, pad, output_padding=out_pad, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.upsample = nn.Sequential(*layers)
        final_k = 5 if kernel_size == 5 else 3
        self.to_rgb = nn.ConvTranspose2d(widths[-1], 3, final_k, 1, final_k // 2)  # stride 1, same size
        dcgan_init_(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"Generator expects z of shape [B, {self.latent_dim}], got {tuple(z.shape)}")
        x = self.project(z).view(z.shape[0], *self.seed_shape)  # [B, C0, h0, w0]
        x = F.relu(self.project_bn(x))
        x = self.upsample(x)  # [B, base_width, H, W]
        return torch.tanh(self.to_rgb(x))  # [B, 3, H, W]


class LsroGenerator(nn.Module):
    """The 6621e2c generator (see the module docstring): z [B, latent_dim] -> image [B, 3, H, W] in [-1, 1]."""

    def __init__(self, latent_dim: int = 100, out_size: tuple[int, int] = (128, 128), base_width: int = 64) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"gan.latent_dim must be >= 1, got {latent_dim!r}")
        n, (h0, w0) = stage_plan(out_size)
        widths = _widths(base_width, n)
        self.latent_dim, self.out_size, self.seed_shape = latent_dim, tuple(out_size), (widths[0], h0, w0)
        self.project = nn.Linear(latent_dim, widths[0] * h0 * w0)
        self.project_bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        for k in range(n):
            c_in, c_out = widths[k], widths[k + 1] if k + 1 < n else 3
            layers += [nn.ConvTranspose2d(c_in, c_out, 5, 2, 2, output_padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        self.upsample = nn.Sequential(*layers)
        self.to_rgb = nn.ConvTranspose2d(3, 3, 5, 1, 2)  # g_h5x: stride 1, same size
        dcgan_init_(self)

    forward = Generator.forward


def build_generator(arch: str, latent_dim: int, out_size: tuple[int, int], base_width: int) -> nn.Module:
    """The generator ``gan.arch`` names: ``ours`` (:class:`Generator`) or ``lsro`` (:class:`LsroGenerator`)."""
    if arch == "ours":
        return Generator(latent_dim, out_size, base_width)
    if arch == "lsro":
        return LsroGenerator(latent_dim, out_size, base_width)
    raise ValueError(f"gan.arch={arch!r} is not valid; choose one of 'ours', 'lsro'")


class Discriminator(nn.Module):
    """image [B, 3, H, W] -> real/fake logit [B]."""

    def __init__(self, in_size: tuple[int, int] = (128, 128), base_width: int = 64, kernel_size: int = 5) -> None:
        super().__init__()
        _check_kernel(kernel_size)
        n, (h0, w0) = stage_plan(in_size)
        widths = _widths(base_width, n)[::-1]  # e.g. [64, 128, 256, 512, 1024]
        self.in_size = tuple(in_size)
        pad = 2 if kernel_size == 5 else 1  # both give an exact 2x downsampling
        layers: list[nn.Module] = []
        c_in = 3
        for k, c_out in enumerate(widths):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size, 2, pad, bias=k == 0))
            if k > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1] * h0 * w0, 1)
        dcgan_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.in_size:
            h, w = self.in_size
            raise ValueError(f"Discriminator expects images [B, 3, {h}, {w}], got {tuple(x.shape)}")
        feats = self.features(x)  # [B, C, h0, w0]
        return self.head(torch.flatten(feats, 1)).squeeze(1)  # [B]


def sample_latent(
    n: int,
    latent_dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """z ~ Uniform[-1, 1]^latent_dim, [n, latent_dim] (as in the LSRO reference code).

    Drawn on the torch.Generator's own device, then moved to ``device``: a CPU generator gives the same z on
    any device, which keeps the generated-image pool reproducible.
    """
    src = generator.device if generator is not None else device
    z = torch.rand(n, latent_dim, generator=generator, device=src) * 2.0 - 1.0
    return z if device is None else z.to(device)


def d_loss(D: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCE(D(real), 1) + BCE(D(fake), 0), and the logits D(real) [B], D(fake) [B'] (for D(x) / D(G(z))).

    ``fake`` is detached so only D receives gradients."""
    logits_real = D(real)  # [B]
    logits_fake = D(fake.detach())  # [B']
    loss_real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    loss_fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return loss_real + loss_fake, logits_real, logits_fake


def g_loss(D: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss BCE(D(G(z)), 1)."""
    logits = D(fake)  # [B]
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
