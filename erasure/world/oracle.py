"""Oracle classifier for the micro world: a small CNN with one head per attribute.

It is trained on fresh renders drawn on the fly, so it never sees the same image twice;
its per-attribute predictions score erasure, and its penultimate embedding serves a
Fréchet distance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .render import ATTRIBUTES, SIZE, render_batch

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Oracle(nn.Module):
    """Three conv blocks (32→16→8 px), global pooling, an embedding, one linear head per attribute."""

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 48, 96),
        embed_dim: int = 128,
        attributes: dict[str, tuple[str, ...]] | None = None,
    ):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.embed_dim = int(embed_dim)
        self.attributes = {k: tuple(v) for k, v in (attributes or ATTRIBUTES).items()}
        blocks, cin = [], 3
        for cout in self.channels:
            blocks.append(_block(cin, cout))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.embed = nn.Linear(cin, self.embed_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(self.embed_dim, len(v)) for k, v in self.attributes.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (N×embed_dim) of images N×3×32×32 in [0, 1]."""
        x = (x - 0.5) / 0.25
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1:
                x = F.max_pool2d(x, 2)
        return F.relu(self.embed(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images) -> tuple[list[dict[str, str]], torch.Tensor]:
        """Attribute names and penultimate features for uint8 images (N×32×32×3 numpy, or a list of
        PIL images), in one pass of the network."""
        was_training = self.training
        self.eval()
        try:
            h = self.features(to_tensor(images).to(next(self.parameters()).device))
            idx = {k: head(h).argmax(dim=1).tolist() for k, head in self.heads.items()}
        finally:
            self.train(was_training)
        return [{k: self.attributes[k][idx[k][i]] for k in self.attributes} for i in range(h.shape[0])], h

    def predict(self, images) -> list[dict[str, str]]:
        """Attribute names for uint8 images (N×32×32×3 numpy, or a list of PIL images)."""
        return self.read(images)[0]


def to_tensor(images) -> torch.Tensor:
    """uint8 N×H×W×3 numpy (or a list of PIL images / arrays) → float N×3×H×W in [0, 1]."""
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        images = np.stack(arrays) if arrays else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected images N×H×W×3, got shape {arr.shape}")
    if arr.shape[1:3] != (SIZE, SIZE):
        raise ValueError(f"expected {SIZE}×{SIZE} images, got {arr.shape[1]}×{arr.shape[2]}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)


def _targets(attrs: list[dict[str, str]], attributes) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([values.index(a[k]) for a in attrs]) for k, values in attributes.items()}


def degrade(x: torch.Tensor, generator: torch.Generator, share: float = 0.5) -> torch.Tensor:
    """Blur (σ ∈ [0.3, 1.3] px) and extra pixel noise on a random ``share`` of images N×3×H×W in [0, 1].

    Generated images are softer than renders; an oracle that only ever saw crisp edges reads a
    slightly blurred cross or triangle as a circle. Colours are left alone: the oracle must still
    tell red from orange.
    """
    n = x.shape[0]
    pick = torch.rand(n, generator=generator) < share
    sigma = 0.3 + torch.rand(n, generator=generator)
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # N×7, separable
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    c = x.shape[1]
    rows = F.conv2d(padded.reshape(1, n * c, *padded.shape[2:]),
                    kernels.repeat_interleave(c, 0)[:, None, None, :], groups=n * c)
    blurred = F.conv2d(rows, kernels.repeat_interleave(c, 0)[:, None, :, None], groups=n * c).reshape_as(x)
    noise = torch.randn(x.shape, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) * 0.03)
    return torch.where(pick[:, None, None, None], (blurred + noise).clamp(0, 1), x)


def train_oracle(steps: int = 1500, batch_size: int = 128, seed: int = 0, show_progress: bool = True,
                 augment: bool = True) -> Oracle:
    """Train an :class:`Oracle` on fresh seeded renders (Adam, one-cycle learning rate), half degraded."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = Oracle()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.15)
    seeds = np.random.SeedSequence(seed).generate_state(max(steps, 1), dtype=np.uint64)
    running: dict[str, float] = {}
    bar = tqdm(range(steps), desc="oracle", disable=not show_progress)
    for step in bar:
        attrs, images = render_batch(batch_size, int(seeds[step]))
        x, y = to_tensor(images), _targets(attrs, model.attributes)
        if augment:
            x = degrade(x, torch.Generator().manual_seed(int(seeds[step]) % 2**63))
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for k in logits:
                acc = (logits[k].argmax(1) == y[k]).float().mean().item()
                running[k] = acc if k not in running else 0.9 * running[k] + 0.1 * acc
        if show_progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k[:5]: f"{v:.3f}" for k, v in running.items()})
    model.eval()
    return model


@torch.no_grad()
def accuracy(oracle: Oracle, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy of ``oracle`` on ``n`` fresh renders."""
    attrs, images = render_batch(n, seed)
    correct = {k: 0 for k in oracle.attributes}
    for start in range(0, n, 500):
        preds = oracle.predict(images[start : start + 500])
        for p, a in zip(preds, attrs[start : start + 500]):
            for k in correct:
                correct[k] += p[k] == a[k]
    return {k: c / n for k, c in correct.items()}


def save_oracle(oracle: Oracle, folder) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "kind": "erasure.world.Oracle",
        "size": SIZE,
        "channels": list(oracle.channels),
        "embed_dim": oracle.embed_dim,
        "attributes": {k: list(v) for k, v in oracle.attributes.items()},
    }
    (folder / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in oracle.state_dict().items()}
    save_file(state, str(folder / _WEIGHTS))
    return folder


def load_oracle(folder) -> Oracle:
    """Load an oracle saved by :func:`save_oracle`; refuses one trained on other attribute lists."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / _CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"no oracle at {folder}: {_CONFIG} is missing")
    config = json.loads(config_path.read_text())
    saved = {k: tuple(v) for k, v in config.get("attributes", {}).items()}
    current = {k: tuple(v) for k, v in ATTRIBUTES.items()}
    if saved != current:
        diffs = []
        for key in sorted(set(saved) | set(current)):
            if key not in saved:
                diffs.append(f"{key}: missing from the saved oracle")
            elif key not in current:
                diffs.append(f"{key}: not a current attribute")
            elif saved[key] != current[key]:
                diffs.append(f"{key}: saved {list(saved[key])} vs current {list(current[key])}")
        raise ValueError(f"oracle at {folder} was trained on different attributes: " + "; ".join(diffs))
    if config.get("size", SIZE) != SIZE:
        raise ValueError(f"oracle at {folder} was trained on {config['size']} px images, not {SIZE}")
    model = Oracle(channels=tuple(config["channels"]), embed_dim=config["embed_dim"], attributes=current)
    model.load_state_dict(load_file(str(folder / _WEIGHTS)))
    model.eval()
    return model
