"""Prompt-token optimisation against an erased model, in the manner of UnlearnDiffAtk (Zhang et al.
2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to Generate Unsafe
Images ... For Now").

K adversarial tokens a_1 … a_K go in front of each attacked prompt p. Their embeddings (K new rows of
the input embedding table of every text encoder that reads the prompt) are optimised so that the
erased model denoises a target image x0 of the concept well under [a; p]:

    a* = argmin_a E_{ε, t} ‖ pred_θ(x_t, t, E([a; p])) − target ‖²  (× the backbone's weight)

with x_t, target and weight from the backbone's add_noise and pred_θ its predict (the same loss as
textual inversion, on one image). Each a_k is then projected to its nearest real token,

    j_k = argmin_j Σ_encoders ‖a_k − W[j]‖²

over the vocabulary's ordinary tokens (W: each encoder's embedding table; the sum runs over every
encoder that reads the prompt, which must share one vocabulary, as SDXL's two CLIPs do), and the
attacked prompt is those tokens' text followed by p: a real prompt that anyone can type, drawn as
text. The projection is made once, after the optimisation (ours, as issue 15 asks; a projection
during it, as PEZ (Wen et al. 2023) does, may find better tokens, so this ASR bounds the method's
from below).
"""

from __future__ import annotations

import torch

from erasure.errors import ModelError
from erasure.eval.textual_inversion import TOKENIZED_ENCODERS, add_placeholder, train_rows

SALT = 16  # this attack's stream of initial tokens, noise and timesteps (trainer.step_generator)


def prompt_tokenizers(pipe) -> list:
    """The pipeline's tokenizers that have an encoder; refused (one line) unless they share one
    vocabulary, since a projected token must be one word of every tokenizer."""
    tokenizers = [getattr(pipe, t) for t, e in TOKENIZED_ENCODERS
                  if getattr(pipe, t, None) is not None and getattr(pipe, e, None) is not None]
    vocabulary = tokenizers[0].get_vocab()
    if any(t.get_vocab() != vocabulary for t in tokenizers[1:]):
        raise ModelError(f"attacks.token_optimisation: {type(pipe).__name__} reads the prompt with tokenizers of "
                         f"different vocabularies ({', '.join(type(t).__name__ for t in tokenizers)}), so one "
                         "projected token is not one word of each; it runs on SD 1.x and SDXL")
    return tokenizers


def ordinary_tokens(tokenizer, rows: int) -> torch.Tensor:
    """Ids a projection may land on: the tokens whose text is printable and tokenizes back to themselves
    alone (ours: CLIP's whole words, not its control bytes or word starts, so the attacked prompt
    typed as text is read as the projected ids), without special tokens (start, end, padding)."""
    # Added tokens are excluded too: another attack's placeholder (textual inversion's S*) is no real word.
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ids = [i for i in range(min(len(tokenizer), rows)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for i, text, back in zip(ids, texts, again)
                         if back == [i] and text.strip() and text.strip().isprintable()])  # typeable


def nearest_tokens(tables: list[torch.Tensor], rows: list[int], candidates: torch.Tensor) -> list[int]:
    """j_k = argmin_j Σ_encoders ‖a_k − W[j]‖² for each adversarial row k (module docstring)."""
    distance = sum(torch.cdist(t[rows].float(), t[candidates].float()).pow(2) for t in tables)
    return candidates[distance.argmin(dim=1)].tolist()


def optimise_prompts(backbone, settings: dict, prompts: list[str], device, show: bool = True) -> tuple[list[str], dict]:
    """Per prompt, the attacked prompt with its K projected tokens in front, and the attack's record
    (image set, mean loss over the first and last quarter of the steps, per prompt its token ids)."""
    from tqdm.auto import tqdm

    from erasure.data.paired import load_prompt_image_set
    from erasure.methods.objectives import denoising_loss
    from erasure.trainer import encode_images, step_generator

    pipe = backbone.pipe
    tokenizers = prompt_tokenizers(pipe)
    data = load_prompt_image_set("attacks.token_optimisation.images", settings["images"])
    mean, std = encode_images(backbone, data, backbone.native_resolution(), device, show)
    encoders = [e for t, e in TOKENIZED_ENCODERS if getattr(pipe, t, None) is not None and getattr(pipe, e, None) is not None]
    tables = [getattr(pipe, e).get_input_embeddings().weight for e in encoders]
    candidates = ordinary_tokens(tokenizers[0], min(len(t) for t in tables))
    placeholders = [f"<adversarial-{k}>" for k in range(settings["tokens"])]
    rows = [add_placeholder(pipe, token, None)[0][2] for token in placeholders]
    tables = [getattr(pipe, e).get_input_embeddings().weight for e in encoders]  # resized where it grew
    seed, steps = settings["seed"], settings["steps"]
    attacked, per_prompt, first, last = [], [], [], []
    for i, prompt in enumerate(tqdm(prompts, desc="token optimisation", unit="prompt", disable=not show)):
        # A target image of the concept per prompt (ours: the forget set's images in turn; UnlearnDiffAtk
        # draws it from the model before erasure for the prompt itself) and random real tokens to start.
        target = i % len(data)
        start = candidates[torch.randint(len(candidates), (len(rows),), generator=step_generator(seed, i, SALT))]
        with torch.no_grad():
            for table in tables:
                table[rows] = table[start]
        text = " ".join(placeholders) + " " + prompt

        def step_loss(step: int) -> torch.Tensor:
            generator = step_generator(seed, i * steps + step, SALT + 1)
            x0 = backbone.latents(mean[target:target + 1], std[target:target + 1],
                                  torch.randn(mean[target:target + 1].shape, generator=generator)).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
            timesteps = backbone.sample_timesteps(1, generator).to(device)
            cond = backbone.encode_prompts_differentiably([text], device)
            return denoising_loss(backbone, backbone.denoiser, x0, noise, timesteps, cond)

        losses = train_rows(backbone, [(t, rows) for t in tables], steps, settings["learning_rate"],
                            settings["weight_decay"], step_loss, "token optimisation", show=False)
        ids = nearest_tokens(tables, rows, candidates)
        words = tokenizers[0].decode(ids).strip()
        attacked.append(f"{words} {prompt}")
        quarter = max(1, len(losses) // 4)
        first.append(sum(losses[:quarter]) / quarter)
        last.append(sum(losses[-quarter:]) / quarter)
        per_prompt.append({"prompt": prompt, "attacked_prompt": attacked[-1], "token_ids": ids,
                           "target_image": target, "loss_last_quarter": last[-1]})
    record = {"images": data.describe(), "loss_first_quarter": sum(first) / len(first),
              "loss_last_quarter": sum(last) / len(last)}
    return attacked, {**record, "prompts": per_prompt}
