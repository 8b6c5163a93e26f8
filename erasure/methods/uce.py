"""UCE, unified concept editing (Gandikota et al. 2024): a closed-form edit of the linear maps that
read the text, training-free.

For each projection W that reads text embeddings (SD 1.x: every cross-attention ``to_k`` / ``to_v``;
SD3: the ``context_embedder`` and the pooled-text embedder, as the reference code edits FLUX), with
c_i the embeddings of the prompts to erase, c_i* those of their guides, and c_j those of the prompts
to preserve (paper, eq. 7):

    W' = ( s_e Σ_i W c_i* c_iᵀ + s_p Σ_j W c_j c_jᵀ + λ W ) ( s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ + λ I )⁻¹

the minimiser of s_e Σ_i ‖W' c_i − W c_i*‖² + s_p Σ_j ‖W' c_j − W c_j‖² + λ ‖W' − W‖²_F.
Every projection that reads the same embeddings shares both brackets' Gram sums, so the edit is
W' = W · M B⁻¹ with one (dim × dim) solve per kind of embedding. A projection's bias, if any, is
left as it is (the reference code's destination W c* + b counts the bias twice; ours does not).

Which token positions count as the vectors c (``uce_token_span``):
- ``last``: the last token before the end-of-text token of each prompt (the reference code's
  ``attention_mask.sum() - 2``; the empty prompt's is its start token);
- ``aligned``: every position from the first token where prompt and guide differ to the end of the
  sequence (padding included: the denoiser reads it), the two aligned from their last real tokens
  backwards, so a twin that drops or replaces the concept word lines up word for word after it.
  Preserved prompts contribute every position.
"""

from __future__ import annotations

import torch

from erasure.backbones import Backbone

SPANS = ("last", "aligned")


def _pairs_last(segment, guide_segment):
    return [(segment.positions[max(segment.real - 2, 0)], guide_segment.positions[max(guide_segment.real - 2, 0)])]


def _pairs_aligned(segment, guide_segment):
    """(edit position, guide position) from the first differing token on, aligned from the end."""
    e_ids, g_ids = segment.ids[:segment.real], guide_segment.ids[:guide_segment.real]
    prefix = 0
    while prefix < min(len(e_ids), len(g_ids)) and e_ids[prefix] == g_ids[prefix]:
        prefix += 1
    shift = guide_segment.real - segment.real
    pairs = []
    for k in range(prefix, len(segment.positions)):
        g = min(max(k + shift, prefix), len(guide_segment.positions) - 1)
        pairs.append((segment.positions[k], guide_segment.positions[g]))
    return pairs


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_n y_n x_nᵀ over rows, in float64."""
    return y.double().T @ x.double()


@torch.no_grad()
def uce_edit(backbone: Backbone, edit_prompts: list[str], guide_prompts: list[str], preserve_prompts: list[str],
             erase_scale: float, preserve_scale: float, lam: float, span: str, device) -> dict[str, float]:
    """Edit ``backbone``'s text projections in place; returns what was done, for the card."""
    if span not in SPANS:
        raise ValueError(f"uce_token_span: {span!r}; one of {', '.join(SPANS)}")
    if len(guide_prompts) != len(edit_prompts):
        raise ValueError("UCE needs one guide prompt per prompt to erase")
    projections = backbone.text_projections()
    everything = list(dict.fromkeys(edit_prompts + guide_prompts + preserve_prompts))
    for module in backbone.text_encoders:
        module.to(device)
    cond, segments = {}, {}
    for start in range(0, len(everything), 32):
        chunk = everything[start:start + 32]
        encoded = backbone.encode_prompts(chunk, device)
        for i, prompt in enumerate(chunk):
            cond[prompt] = {k: v[i].float().cpu() for k, v in encoded.items()}
        segments.update(zip(chunk, backbone.token_segments(chunk)))
    for module in backbone.text_encoders:
        module.to("cpu")

    pair = _pairs_last if span == "last" else _pairs_aligned
    edited, vectors = {}, {}
    for key, modules in projections.items():
        # rows of C (erase), C* (their guides), P (preserve) for this kind of embedding
        c, c_star, p = [], [], []
        for edit, guide in zip(edit_prompts, guide_prompts):
            e, g = cond[edit][key], cond[guide][key]
            if e.ndim == 1:  # a pooled embedding: one vector per prompt
                c.append(e[None])
                c_star.append(g[None])
                continue
            for seg, gseg in zip(segments[edit], segments[guide]):
                idx = pair(seg, gseg)
                c.append(e[[i for i, _ in idx]])
                c_star.append(g[[j for _, j in idx]])
        for prompt in preserve_prompts:
            x = cond[prompt][key]
            if x.ndim == 1:
                p.append(x[None])
                continue
            for seg in segments[prompt]:
                positions = seg.positions if span == "aligned" else [seg.positions[max(seg.real - 2, 0)]]
                p.append(x[positions])
        c, c_star = torch.cat(c), torch.cat(c_star)
        dim = c.shape[1]
        eye = torch.eye(dim, dtype=torch.float64)
        preserve = _gram(torch.cat(p), torch.cat(p)) if p else torch.zeros_like(eye)
        # W' = W·M·B⁻¹, with W·M the left bracket and B the right one
        m = lam * eye + erase_scale * _gram(c, c_star) + preserve_scale * preserve
        b = lam * eye + erase_scale * _gram(c, c) + preserve_scale * preserve
        k = torch.linalg.solve(b.T, m.T).T  # M B⁻¹ (B is symmetric; solve instead of an explicit inverse)
        for name, module in modules:
            w = module.weight
            module.weight.copy_((w.double() @ k).to(w.dtype))
            edited[name] = key
        vectors[key] = {"erased": len(c), "preserved": sum(len(x) for x in p)}
    return {"projections": sorted(edited), "vectors": vectors}
