"""Training batches. Today: a generated latent image set for the tiny config and tests (real image/caption
data, VAE latents and text encoders arrive with the data issue, behind the same interface).

A source is deterministic in (seed, step): `batch(step)` always returns the same examples, so a resumed
run continues exactly; its position is the step.
"""

from __future__ import annotations

import numpy as np

from jaxdistill.spec import UNetSpec


class SyntheticLatents:
    """A small generated data set in latent space: `num_classes` smooth prototype patterns (each with its
    own caption embedding, pooled embedding and SDXL size/crop time ids), every example a prototype plus
    smooth variation. A diffusion model can learn it in minutes on a CPU, so a tiny teacher trained on it
    is a real denoiser with something to distil."""

    def __init__(self, spec: UNetSpec, *, resolution: int = 128, seq_len: int = 8, num_examples: int = 64,
                 num_classes: int = 8, batch_size: int = 8, seed: int = 0):
        rng = np.random.default_rng(seed)
        side = resolution // 8
        if side % 2 ** (spec.num_blocks - 1):
            raise ValueError(f"data.resolution={resolution}: the latent side {side} must be divisible by "
                             f"{2 ** (spec.num_blocks - 1)} for this UNet")
        self.batch_size, self.seed, self.num_examples = batch_size, seed, num_examples
        coarse = rng.standard_normal((num_classes, 4, 4, spec.in_channels)).astype(np.float32)
        prototypes = _upsample(coarse, side)
        labels = rng.integers(0, num_classes, num_examples)
        variation = _upsample(rng.standard_normal((num_examples, 8, 8, spec.in_channels)).astype(np.float32), side)
        self.latents = (prototypes[labels] + 0.2 * variation).astype(np.float32)
        self.latents /= self.latents.std()
        context = rng.standard_normal((num_classes, seq_len, spec.cross_attention_dim)).astype(np.float32)
        self.encoder_hidden_states = context[labels]
        self.time_ids = np.tile(np.array([resolution, resolution, 0, 0, resolution, resolution], np.float32),
                                (num_examples, 1))
        if spec.addition_embed_type == "text_time":
            pooled_dim = spec.projection_class_embeddings_input_dim - 6 * spec.addition_time_embed_dim
            self.text_embeds = rng.standard_normal((num_classes, pooled_dim)).astype(np.float32)[labels]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of global step `step`: examples in a fresh permutation every epoch."""
        per_epoch = max(self.num_examples // self.batch_size, 1)
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        index = np.resize(order[offset * self.batch_size:], self.batch_size)
        out = {"latents": self.latents[index], "encoder_hidden_states": self.encoder_hidden_states[index],
               "time_ids": self.time_ids[index]}
        if hasattr(self, "text_embeds"):
            out["text_embeds"] = self.text_embeds[index]
        return out


def _upsample(x: np.ndarray, side: int) -> np.ndarray:
    """Smooth upsampling [N, h, w, C] → [N, side, side, C] (bilinear via two 1-D interpolations)."""
    n, h, w, c = x.shape
    ys, xs = np.linspace(0, h - 1, side), np.linspace(0, w - 1, side)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    rows = x[:, y0] * (1 - fy) + x[:, y1] * fy
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
