"""What the run shows: TensorBoard scalars and image panels, sample PNGs, the progress bar.

Only rank 0 writes. Image panels use the EMA generator and the plain encoder, in eval mode.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bicogan_dist.imaging import grid_array, labelled_grid, save_png, to_uint8


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
            if progress:
                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.samples_dir = run_dir / "samples"

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        if self.bar is not None and "loss/d" in values:
            self.bar.set_postfix(img_s=f"{values.get('perf/images_per_s', 0):.0f}",
                                 d=f"{values.get('loss/d', 0):.3f}", ge=f"{values.get('loss/ge', 0):.3f}")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    @torch.no_grad()
    def images(self, step: int, G_ema: nn.Module, E: nn.Module | None, fixed_z: torch.Tensor,
               label_names: list[str], conditional: bool, real: torch.Tensor, real_labels: torch.Tensor) -> Path | None:
        """Fixed-noise grid (one row per emotion), real vs G(E(x)), and emotion transfer panels."""
        if not self.enabled:
            return None
        was_training = G_ema.training, (E.training if E is not None else False)
        G_ema.eval()
        if E is not None:
            E.eval()
        n_cls, cols = len(label_names), fixed_z.shape[0]
        rows = n_cls if conditional else 1
        z = fixed_z.repeat(rows, 1)
        c = torch.arange(rows, device=z.device).repeat_interleave(cols) if conditional else None
        grid = to_uint8(G_ema(z, c))
        self.writer.add_image("samples/per_emotion", grid_array(grid, rows, cols), step, dataformats="HW")
        png = save_png(labelled_grid(grid, rows, cols, list(label_names) if conditional else None),
                       self.samples_dir / f"step-{step:08d}.png")
        if E is not None and real.numel():
            x = real.float()
            z_hat, logits = E(x)
            recon = to_uint8(G_ema(z_hat, logits.argmax(1) if logits is not None else None))
            pairs = torch.stack([to_uint8(x), recon], dim=1).flatten(0, 1)
            self.writer.add_image("reconstruction/real_vs_GEx", grid_array(pairs, x.shape[0], 2), step,
                                  dataformats="HW")
            if conditional and logits is not None:
                k = x.shape[0]
                z_rep = z_hat.repeat_interleave(n_cls, 0)
                targets = torch.arange(n_cls, device=x.device).repeat(k)
                moved = to_uint8(G_ema(z_rep, targets)).view(k, n_cls, 1, *x.shape[-2:])
                panel = torch.cat([to_uint8(x).unsqueeze(1), moved], dim=1).flatten(0, 1)
                self.writer.add_image("transfer/real_then_each_emotion", grid_array(panel, k, n_cls + 1), step,
                                      dataformats="HW")
        G_ema.train(was_training[0])
        if E is not None:
            E.train(was_training[1])
        self.writer.flush()
        return png

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def encoder_accuracy(E: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Emotion accuracy of E's head on a held-out batch (eval mode)."""
    was = E.training
    E.eval()
    _, logits = E(images)
    E.train(was)
    return float((logits.argmax(1) == labels).float().mean())

