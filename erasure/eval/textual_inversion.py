"""Textual inversion against an erased model (Pham et al. 2023, "Circumventing Concept Erasure Methods
for Text-to-Image Generative Models"): the erased model's weights stay as they are; one new word is
learned whose embedding makes it draw the concept again.

A placeholder token S* is added to every tokenizer of the pipeline, with a new row v_k in the input
embedding table of the text encoder that reads that tokenizer's ids (SD 1.x: one CLIP; SDXL and SD3:
both CLIPs, and T5 where SD3 loads it; FLUX: CLIP and T5). Only those rows train, on the forget
images x0 with their captions y (the concept's words replaced by S*), by the erased model's own
denoising loss (Gal et al. 2023, eq. 2, which Pham et al. minimise with the erased ε_θ):

    v* = argmin_v  E_{x0, y, ε, t} ‖ pred_θ(x_t, t, E_v(y)) − target ‖²  (× the backbone's weight)

where x_t, the target (ε, v or flow velocity) and the weight are the backbone's add_noise, pred_θ its
predict. The attacked prompts are the suite's prompts with the concept's words replaced by S*.
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from erasure.errors import DataError

# The tokenizer / text-encoder pairs a diffusers pipeline may hold; each that is loaded gets S*.
TOKENIZED_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                      ("tokenizer_3", "text_encoder_3"))
# diffusers' textual_inversion example: AdamW(β = (0.9, 0.999), weight decay 1e-2, ε = 1e-8).
ADAM_BETAS, WEIGHT_DECAY, ADAM_EPSILON = (0.9, 0.999), 1e-2, 1e-8
SALT = 15  # this attack's stream of batch rows, noise and timesteps (trainer.step_generator)


def concept_words(suite: dict, settings: dict) -> list[str]:
    """The words that ask for the concept: the setting `concept`, else the micro world's concept and
    its alias (erasure/world/render.py ALIASES), which the world's captions use as often."""
    if settings.get("concept"):
        return [settings["concept"]]
    from erasure.eval.micro import concept_attribute
    from erasure.world.render import ALIASES

    concept = suite["metrics"]["micro_world"]["concept"]
    alias = ALIASES.get(concept_attribute(concept), {}).get(concept)
    return [concept] + ([alias] if alias else [])


def placeholder_prompt(prompt: str, words: list[str], token: str) -> str:
    """The prompt with each of the concept's words replaced by S*; a prompt that names none of them
    (an I2P prompt) gets S* in front, so that every attacked prompt carries the learned word."""
    pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
    replaced, count = re.subn(pattern, token, prompt, flags=re.IGNORECASE)
    return replaced if count else f"{token} {prompt}"


def add_placeholder(pipe, token: str, init: str | None) -> list[tuple[str, torch.nn.Module, int]]:
    """S* in every loaded tokenizer, and its row in the encoder that reads the tokenizer's ids, set to
    the mean of ``init``'s token rows (diffusers' example takes one initializer token; a word that
    the tokenizer splits is averaged here; None leaves the row for the caller to set). Returns
    (encoder name, encoder, row) per encoder."""
    added = []
    for tokenizer_name, encoder_name in TOKENIZED_ENCODERS:
        tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
        if tokenizer is None or encoder is None:
            continue
        if tokenizer.add_tokens(token) == 0:
            raise DataError(f"attacks.textual_inversion.token: {token!r} is already a token of the model's "
                            f"{tokenizer_name}; choose a placeholder it does not know, such as '<concept>'")
        row = tokenizer.convert_tokens_to_ids(token)
        if row >= encoder.get_input_embeddings().num_embeddings:  # T5's table has spare rows already
            encoder.resize_token_embeddings(row + 1, mean_resizing=False)  # the row is set below
            # transformers swaps the grown table into the same Parameter, whose autograd node still
            # has the old shape after a second resize: a fresh Parameter trains cleanly.
            embedding = encoder.get_input_embeddings()
            embedding.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        added.append((encoder_name, encoder, row))
        if init is None:
            continue
        table = encoder.get_input_embeddings().weight
        init_ids = [i for i in tokenizer(init, add_special_tokens=False)["input_ids"] if i != row]
        if not init_ids:
            raise DataError(f"attacks.textual_inversion.init: {init!r} has no token in {tokenizer_name}")
        with torch.no_grad():
            table[row] = table[init_ids].mean(0)
    return added


def learn_token_embedding(backbone, settings: dict, words: list[str], device, show: bool = True) -> tuple[dict, dict]:
    """v* by the erased model's denoising loss (module docstring). Leaves S* in the pipeline's
    tokenizers and its learned rows in the encoders; returns {encoder name: v* shaped (1, d)} and the
    record of the run (the image set, the mean loss over the first and the last quarter of the steps)."""
    from erasure.data.paired import load_prompt_image_set
    from erasure.methods.objectives import denoising_loss
    from erasure.trainer import batch_rows, encode_images, step_generator

    pipe, token = backbone.pipe, settings["token"]
    data = load_prompt_image_set("attacks.textual_inversion.images", settings["images"])
    # The image's own caption with S* for the concept (ours: Pham et al. use textual inversion's
    # templates, "a photo of a S*"; the forget sets carry captions, and the micro world's vocabulary
    # has no template words).
    prompts = [placeholder_prompt(p, words, token) for p in data.prompts]
    mean, std = encode_images(backbone, data, backbone.native_resolution(), device, show)
    added = add_placeholder(pipe, token, settings["init"] or words[0])

    tables = [(encoder.get_input_embeddings().weight, [row]) for _, encoder, row in added]
    seed, batch = settings["seed"], settings["batch_size"]

    def step_loss(step: int) -> torch.Tensor:
        rows = batch_rows(len(data), batch, step, seed, SALT)
        generator = step_generator(seed, step, SALT)
        latent_noise = torch.randn(mean[rows].shape, generator=generator)
        x0 = backbone.latents(mean[rows], std[rows], latent_noise).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
        timesteps = backbone.sample_timesteps(len(rows), generator).to(device)
        cond = backbone.encode_prompts_differentiably([prompts[i] for i in rows], device)
        return denoising_loss(backbone, backbone.denoiser, x0, noise, timesteps, cond)

    losses = train_rows(backbone, tables, settings["steps"], settings["learning_rate"], WEIGHT_DECAY, step_loss,
                        "textual inversion", show)
    quarter = max(1, len(losses) // 4)
    record = {"images": data.describe(), "loss_first_quarter": sum(losses[:quarter]) / quarter,
              "loss_last_quarter": sum(losses[-quarter:]) / quarter}
    return {name: encoder.get_input_embeddings().weight[row:row + 1].detach().float().cpu().clone()
            for name, encoder, row in added}, record


def train_rows(backbone, tables: list[tuple[torch.Tensor, list[int]]], steps: int, learning_rate: float,
               weight_decay: float, step_loss, desc: str, show: bool) -> list[float]:
    """Minimise ``step_loss(step)`` over the given rows of embedding tables, everything else frozen;
    the losses per step. AdamW's weight decay reaches every row of a table, so the other rows are put
    back after each step (as diffusers' textual_inversion example does): only the given rows change."""
    backbone.denoiser.requires_grad_(False)
    for module in backbone.encoders:
        module.requires_grad_(False)
    frozen = []
    for table, rows in tables:
        table.requires_grad_(True)
        keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
        keep[rows] = False
        frozen.append((keep, table.detach()[keep].clone()))
    optimizer = torch.optim.AdamW([t for t, _ in tables], lr=learning_rate, betas=ADAM_BETAS,
                                  weight_decay=weight_decay, eps=ADAM_EPSILON)
    losses = []
    for step in tqdm(range(steps), desc=desc, unit="step", disable=not show):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        with torch.no_grad():
            for (table, _), (keep, original) in zip(tables, frozen):
                table[keep] = original
    for table, _ in tables:
        table.requires_grad_(False)
    return losses


def embedding_file(learned: dict, token: str, family: str) -> dict[str, torch.Tensor]:
    """The learned rows in the layout diffusers' load_textual_inversion reads: {S*: v} for one
    encoder (its textual_inversion example's learned_embeds); {"clip_l", "clip_g"} for SDXL, each
    loaded with its tokenizer and encoder; the pipeline's encoder names otherwise (SD3, FLUX)."""
    if len(learned) == 1:
        return {token: next(iter(learned.values()))}
    if family == "sdxl":
        return {"clip_l": learned["text_encoder"], "clip_g": learned["text_encoder_2"]}
    return dict(learned)
