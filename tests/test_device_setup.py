"""Per-device speed settings (``engine_base.device_defaults``) and, on a GPU, that the augmentation copies its
CPU-drawn parameters without a host sync."""
from __future__ import annotations

import pytest
import torch

from bicogan_dist.data.augment import PRESETS, AugmentConfig, build_augmenter
from bicogan_dist.train.engine_base import device_defaults


@pytest.fixture
def restore_backend_flags():
    matmul, conv, bench = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                           torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
    torch.backends.cudnn.benchmark = bench


def test_cpu_keeps_torchs_defaults(restore_backend_flags):
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.benchmark)
    assert device_defaults(torch.device("cpu"), "no") == {}
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.benchmark) == before


@pytest.mark.parametrize("precision, tf32", [("no", True), ("bf16", False), ("fp16", False)])
def test_cuda_turns_on_cudnn_benchmark_and_tf32_only_in_fp32(restore_backend_flags, precision, tf32):
    """The flags are process-wide switches, so setting them needs no GPU; what they do on one is torch's."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.benchmark = False
    assert device_defaults(torch.device("cuda", 0), precision) == ({"cudnn.benchmark": True, "tf32": True} if tf32
                                                                  else {"cudnn.benchmark": True})
    assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torch_augmenter_does_not_sync_the_gpu():
    """Every op, with p < 1 (the path that picks the moved images): no call may wait for the GPU."""
    aug = build_augmenter(AugmentConfig(ops=list(PRESETS), backend="torch", p=0.7))
    images = torch.randint(0, 256, (64, 1, 48, 48), dtype=torch.uint8, device="cuda")
    aug(images, seed=0)  # warm-up: cached grids, cuDNN/cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug(images, seed=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == images.shape and out.device.type == "cuda"
