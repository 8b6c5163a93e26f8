"""Class labels as conditioning: a class-conditional model's "prompts" are its class names.

The empty prompt is the null class, the label classifier-free guidance takes as unconditional, so
ESD's "∅" and SalUn's guided saliency read it as they read "" on a text model.
"""

from __future__ import annotations

import torch

from erasure.errors import DataError


class ClassLabels:
    def __init__(self, names: dict[str, int], null_class: int, model: str):
        """``names``: class name → label id (several names may share an id, as in ImageNet's
        "tench, Tinca tinca"); ``model`` names the model in messages."""
        self.names, self.null_class, self.model = names, null_class, model
        # Sorted: other() indexes into it by rank.
        self.known = torch.tensor(sorted(set(names.values())), dtype=torch.long)

    def encode(self, prompts: list[str], device) -> torch.Tensor:
        labels = []
        for prompt in prompts:
            name = prompt.strip()
            if name and name not in self.names:
                shown = ", ".join(list(self.names)[:5])
                raise DataError(f"prompt {prompt!r} names no class of {self.model}: a class-conditional model's "
                                f"prompts are its class names ({len(self.names)}, such as {shown}), or '' for "
                                "its null class")
            labels.append(self.names[name] if name else self.null_class)
        return torch.tensor(labels, dtype=torch.long, device=device)

    def other(self, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per sample, a known class other than its own, uniformly: rank k of the n - 1 others, k = ⌊u (n - 1)⌋,
        skipping the sample's own rank (SalUn's random relabelling, Fan et al. 2024, class-wise forgetting)."""
        if len(self.known) < 2:
            raise DataError(f"salun relabels each forget image to another class; {self.model} names only "
                            f"{len(self.known)} class")
        known = self.known.to(labels.device)
        k = (u.to(labels.device) * (len(known) - 1)).long().clamp(max=len(known) - 2)
        own_rank = torch.searchsorted(known, labels)
        return known[k + (k >= own_rank).long()]
