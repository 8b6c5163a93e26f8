"""Methods = a forget objective, a retain objective and an update rule (DESIGN.md, "Methods").

The table below is the whole difference between the methods; GradDiff/GradDiffD and RG/RGD differ
only in the data their recipes point at (uniform vs diversified D_f/D_r).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    forget: str | None  # which forget objective (see erasure.methods.objectives), or none
    retain: bool  # whether l_r on D_r is minimised
    restricted: bool  # restricted gradient (RG/RGD) instead of the weighted sum
    saliency_mask: bool = False  # SalUn: only the salient weights move
    closed_form: bool = False  # UCE: one edit, no training steps


METHOD_TABLE = {
    "finetune": Method(forget=None, retain=True, restricted=False),
    "graddiff": Method(forget="ascent", retain=True, restricted=False),
    "graddiffd": Method(forget="ascent", retain=True, restricted=False),
    "rg": Method(forget="ascent", retain=True, restricted=True),
    "rgd": Method(forget="ascent", retain=True, restricted=True),
    "esd-u": Method(forget="esd", retain=False, restricted=False),
    "esd-x": Method(forget="esd", retain=False, restricted=False),
    "salun": Method(forget="relabel", retain=True, restricted=False, saliency_mask=True),
    "msgm-orthogonal": Method(forget="orthogonal", retain=True, restricted=False),
    "msgm-obtuse": Method(forget="obtuse", retain=True, restricted=False),
    "uce": Method(forget=None, retain=False, restricted=False, closed_form=True),
}
