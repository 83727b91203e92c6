"""DCGAN generator/discriminator (trainables/gan/nets.py): shapes per configured size, errors, one Adam step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainables.gan.nets import Discriminator, Generator, d_loss, g_loss, sample_latent

SIZES = [(128, 128), (64, 64), (64, 32), (128, 64)]


@pytest.mark.parametrize("size", SIZES)
def test_shapes_per_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    G, D = Generator(16, out_size=size, base_width=8), Discriminator(in_size=size, base_width=8)
    fake = G(sample_latent(2, 16))
    assert fake.shape == (2, 3, *size)
    assert D(fake).shape == (2,)


def test_default_width_64x32() -> None:
    G, D = Generator(out_size=(64, 32)), Discriminator(in_size=(64, 32))
    G.eval()
    with torch.no_grad():
        fake = G(sample_latent(2, 100))
        assert fake.shape == (2, 3, 64, 32) and D(fake).shape == (2,)
    assert G.upsample[0].in_channels == 512 and D.features[0].out_channels == 64


def test_paper_widths_128() -> None:
    G = Generator(out_size=(128, 128), kernel_size=5)
    assert G.seed_shape == (1024, 4, 4)
    deconvs = [m for m in G.upsample if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [m.out_channels for m in deconvs] == [512, 256, 128, 64, 64]


@pytest.mark.parametrize("bad", [(100, 100), (128, 32), (48, 48), (4, 4)])
def test_unsupported_size(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="gan.image_size"):
        Generator(out_size=bad)
    with pytest.raises(ValueError, match="gan.image_size"):
        Discriminator(in_size=bad)


def test_sample_latent_range_and_seed() -> None:
    z1 = sample_latent(64, 10, torch.Generator().manual_seed(1))
    z2 = sample_latent(64, 10, torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and z1.min() >= -1 and z1.max() <= 1 and z1.min() < -0.5


def test_one_adam_step_is_finite() -> None:
    torch.manual_seed(0)
    size = (32, 32)
    G, D = Generator(16, out_size=size, base_width=8), Discriminator(in_size=size, base_width=8)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(4, 3, *size) * 2 - 1
    fake = G(sample_latent(4, 16))
    assert fake.min() >= -1 and fake.max() <= 1

    loss_d, logits_real, logits_fake = d_loss(D, real, fake)
    assert logits_real.shape == logits_fake.shape == (4,)
    assert torch.allclose(loss_d, F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())  # the BCE terms
    opt_d.zero_grad()
    loss_d.backward()
    assert all(p.grad is None for p in G.parameters())  # fake was detached
    opt_d.step()

    loss_g = g_loss(D, fake)
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()

    assert torch.isfinite(loss_d) and torch.isfinite(loss_g)
    for p in [*G.parameters(), *D.parameters()]:
        assert torch.isfinite(p).all()
