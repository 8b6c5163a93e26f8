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
    # The conditionings it has a meaning for (Backbone.conditioning), and why not the others.
    runs_on: tuple[str, ...] = ("text", "class", "none")
    needs: str = ""


GUIDED = ("text", "class")  # the methods that need a conditioning to move away from or toward
ESD_NEEDS = "guides from the concept's conditioning to the empty one (a prompt or a class and its null)"


METHOD_TABLE = {
    "finetune": Method(forget=None, retain=True, restricted=False),
    "graddiff": Method(forget="ascent", retain=True, restricted=False),
    "graddiffd": Method(forget="ascent", retain=True, restricted=False),
    "rg": Method(forget="ascent", retain=True, restricted=True),
    "rgd": Method(forget="ascent", retain=True, restricted=True),
    "esd-u": Method(forget="esd", retain=False, restricted=False, runs_on=GUIDED,
                    needs=ESD_NEEDS),
    "esd-x": Method(forget="esd", retain=False, restricted=False, runs_on=GUIDED,
                    needs=ESD_NEEDS),
    "salun": Method(forget="relabel", retain=True, restricted=False, saliency_mask=True, runs_on=GUIDED,
                    needs="relabels the forget images to an anchor prompt or another class"),
    "msgm-orthogonal": Method(forget="orthogonal", retain=True, restricted=False),
    "msgm-obtuse": Method(forget="obtuse", retain=True, restricted=False),
    "uce": Method(forget=None, retain=False, restricted=False, closed_form=True, runs_on=("text",),
                  needs="edits, in closed form, the projections that read text embeddings"),
}
