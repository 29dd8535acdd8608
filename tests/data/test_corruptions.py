"""Fashion-MNIST-C: ImageNet-C corruptions (corrupt-tta) on 28x28 grayscale images."""

from __future__ import annotations

import pytest
import torch

from smoe.data.corruptions import IMAGENET_C_CORRUPTIONS, corrupt_images, corruption_names


def test_every_benchmark_corruption_runs_at_28px_and_is_seeded():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 28, 28)
    assert set(IMAGENET_C_CORRUPTIONS) <= set(corruption_names()) and len(IMAGENET_C_CORRUPTIONS) == 15
    for name in IMAGENET_C_CORRUPTIONS:
        out = corrupt_images(images, name, 3, seed=1)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        assert not torch.allclose(out, images, atol=1e-3), name
        assert torch.equal(out, corrupt_images(images, name, 3, seed=1)), name  # the seed decides


def test_severity_grows_the_damage_and_global_numpy_state_is_left_alone():
    import numpy as np

    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    dist = [float((corrupt_images(images, "gaussian_noise", s) - images).abs().mean()) for s in (1, 3, 5)]
    assert dist[0] < dist[1] < dist[2]
    assert (np.random.get_state()[1] == before).all()


def test_bad_arguments_are_named():
    images = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt_images(images, "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt_images(images, "fog", 6)
    with pytest.raises(ValueError, match="images"):
        corrupt_images(torch.rand(2, 28, 28), "fog", 1)
