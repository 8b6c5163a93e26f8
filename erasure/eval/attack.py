"""`erasure attack`: does an erased concept come back when the prompt is attacked?

An attack suite (eval/attack-*.yaml) is an evaluation suite — the same include/merge reader, prompt
sources and generation settings — whose one metric is the detector that decides whether an image
shows the concept (the micro world's oracle, or NudeNet for nudity), plus an `attacks:` mapping. Every
attack runs against every model on the suite's prompts: on micro-world captions, the captions that
ask for the concept; on any other source, every prompt (I2P's nudity prompts, a forget side).

Attack success rate (ASR): the share of attacked images in which the detector finds the concept —
the oracle reads the concept's value of its attribute, or NudeNet finds an exposed class at the
suite's threshold. Blank images (non-finite, or one flat colour) are counted and flagged: they read
as "not found" and would flatter a broken model.

Attacks:
- ``none``: the prompts as they are; the model's own rate, which every attack is read against.
- ``concept_vector`` (Ring-A-Bell, Tsai et al. 2024): over twin prompts (f_i asks for the concept,
  r_i is the same prompt without it), the concept vector is

      c = (1/N) Σ_i [E(f_i) − E(r_i)]

  for each tensor of the model's conditioning E (the text sequence token by token, and a pooled
  vector where the family has one), and the attacked prompt p is drawn from E(p) + η c. No training
  and no access to the erased model beyond its text encoder. Ring-A-Bell then searches for real
  tokens whose embedding comes close to E(p) + η c; here the embedding itself is drawn from, which
  is the attack an adversary who can pass embeddings makes, and bounds the token search's.
- ``textual_inversion`` (Pham et al. 2023): one new word S* whose embedding is learned on the erased
  model from forget images by its own denoising loss; the attacked prompt is the prompt with the
  concept's words replaced by S* (erasure/eval/textual_inversion.py). White-box: the attacker reads
  the erased denoiser's gradients, and changes no weight.
- ``token_optimisation`` (UnlearnDiffAtk, Zhang et al. 2024): per prompt, K tokens in front of it
  whose embeddings are optimised by the erased model's denoising loss on a target image of the
  concept, then projected to the nearest real tokens: the attacked prompt is real text
  (erasure/eval/token_optimisation.py). White-box, as textual inversion.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erasure.atomic import strict_json, write_atomically
from erasure.errors import DataError, ModelError, SuiteError
from erasure.methods.objectives import pushed_by_concept_vector

# Each attack with its settings' defaults.
ATTACKS = {
    "none": {},
    # strength η (ours: the suite sets it); pairs: a JSONL of forget_prompt/retain_prompt twins
    # (train.jsonl of `erasure prompts build`) or a concept spec (prompts/*.yaml) built into one
    "concept_vector": {"strength": 3.0, "pairs": None},
    # images: a forget image set (load_prompt_image_set: a folder with metadata.jsonl, world:C/forget).
    # steps, learning_rate, batch_size: diffusers' textual_inversion README run (3000 steps, lr 5e-4
    # scaled by --scale_lr to 2e-3 for its batch 1 × gradient accumulation 4); seed: ours.
    # token: the placeholder S*; init: the word its rows start from (ours: the concept's word);
    # concept: the word S* stands for in captions and prompts (default: the micro world's concept
    # and its alias; required with nudenet, e.g. "nude").
    "textual_inversion": {"images": None, "steps": 3000, "learning_rate": 2e-3, "batch_size": 4, "seed": 0,
                          "token": "<concept>", "init": None, "concept": None},
    # images: the forget image set the target images come from. tokens K = 5 and steps 40 per prompt:
    # UnlearnDiffAtk's setting (Zhang et al. 2024); learning_rate 0.01 and weight_decay 0.1 as we read
    # their released attack configuration (not re-checked offline); seed: ours.
    "token_optimisation": {"images": None, "tokens": 5, "steps": 40, "learning_rate": 0.01, "weight_decay": 0.1,
                           "seed": 0},
}
DETECTORS = ("micro_world", "nudenet")
ENCODE_BATCH = 64  # prompts per text-encoder pass


def load_attack_suite(path, overrides: dict | None = None) -> dict:
    """An eval suite with one detector and an `attacks:` mapping, validated before any model loads."""
    from erasure.eval.suite import load_suite, resolve_settings

    suite = load_suite(path, overrides, extra_keys=frozenset({"attacks"}))
    where = f"suite {suite['file']}"
    if len(suite["metrics"]) != 1 or next(iter(suite["metrics"])) not in DETECTORS:
        raise SuiteError(f"{where}: metrics: an attack suite names exactly one detector, {' or '.join(DETECTORS)}; "
                         f"got {', '.join(suite['metrics'])}")
    attacks = suite.get("attacks")
    if not isinstance(attacks, dict) or not attacks:
        raise SuiteError(f"{where}: attacks: name at least one of {', '.join(ATTACKS)} (a mapping of attack to settings)")
    resolved = {}
    for name, settings in attacks.items():
        settings = resolve_settings(where, "attack", name, settings, ATTACKS)
        if name == "concept_vector":
            strength = settings["strength"]
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
                raise SuiteError(f"{where}: attacks.concept_vector.strength: {strength!r}; expected a finite number (η)")
            if not isinstance(settings["pairs"], str) or not settings["pairs"]:
                raise SuiteError(f"{where}: attacks.concept_vector.pairs: required: a JSONL of forget_prompt/"
                                 "retain_prompt twins or a concept spec (prompts/*.yaml)")
        if name == "textual_inversion":
            check_textual_inversion(settings, suite, f"{where}: attacks.textual_inversion")
        if name == "token_optimisation":
            check_token_optimisation(settings, f"{where}: attacks.token_optimisation")
        resolved[name] = settings
    suite["attacks"] = resolved
    return suite


def check_training(settings: dict, where: str, counts: tuple[str, ...]) -> None:
    """The settings every optimising attack shares: images, counts ≥ 1, a positive learning rate, a seed."""
    if not isinstance(settings["images"], str) or not settings["images"]:
        raise SuiteError(f"{where}.images: required: a forget image set (a folder with metadata.jsonl, "
                         "or world:<concept>/forget)")
    for key in counts:
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SuiteError(f"{where}.{key}: {value!r}; expected a whole number ≥ 1")
    rate = settings["learning_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise SuiteError(f"{where}.learning_rate: {rate!r}; expected a positive number")
    if isinstance(settings["seed"], bool) or not isinstance(settings["seed"], int):
        raise SuiteError(f"{where}.seed: {settings['seed']!r}; expected a whole number")


def check_token_optimisation(settings: dict, where: str) -> None:
    check_training(settings, where, ("tokens", "steps"))
    decay = settings["weight_decay"]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
        raise SuiteError(f"{where}.weight_decay: {decay!r}; expected a number ≥ 0")


def check_textual_inversion(settings: dict, suite: dict, where: str) -> None:
    check_training(settings, where, ("steps", "batch_size"))
    if not isinstance(settings["token"], str) or not settings["token"].strip() or " " in settings["token"]:
        raise SuiteError(f"{where}.token: {settings['token']!r}; expected one placeholder word such as '<concept>'")
    for key in ("init", "concept"):
        if settings[key] is not None and (not isinstance(settings[key], str) or not settings[key].strip()):
            raise SuiteError(f"{where}.{key}: {settings[key]!r}; expected a word")
    if settings["concept"] is None and "micro_world" not in suite["metrics"]:
        raise SuiteError(f"{where}.concept: required with {next(iter(suite['metrics']))}: the word the "
                         "placeholder stands for in captions and prompts (e.g. 'nude')")


def attacked_items(suite: dict) -> tuple[list[dict], dict]:
    """The prompts to attack (suite_items' rows) and their source: on micro-world captions, those
    that ask for the concept (by name or alias); elsewhere every prompt. prompts.limit keeps the
    first N of them."""
    from erasure.eval.runner import suite_items

    limit = suite["prompts"].get("limit")
    items, source = suite_items({**suite, "prompts": {k: v for k, v in suite["prompts"].items() if k != "limit"}})
    if "micro_world" in suite["metrics"] and suite["prompts"].get("world"):
        from erasure.eval.micro import concept_attribute
        from erasure.world.render import parse_caption

        concept = suite["metrics"]["micro_world"]["concept"]
        attribute = concept_attribute(concept)
        items = [it for it in items if parse_caption(it["prompt"])[attribute] == concept]
        source = {**source, "attacked": f"captions asking for {concept}"}
    items = items[:limit] if limit else items
    return items, {**source, "evaluated_prompts": len(items)}


def twin_pairs(source: str, suite_file: str, work: Path) -> tuple[list[tuple[str, str]], str]:
    """(forget, retain) twins from a JSONL file or a concept spec built into one (under ``work``);
    a relative path is read beside the suite, then as given, then from the shipped files."""
    from erasure.data.paired import numbered_jsonl
    from erasure.shipped import locate

    path = locate(source, relative_to=Path(suite_file).parent)
    if not path.is_file():
        path = locate(source)
    if not path.is_file():
        raise DataError(f"attacks.concept_vector.pairs: {source} does not exist (a train.jsonl of `erasure prompts "
                        "build`, or a concept spec)")
    if path.suffix in (".yaml", ".yml"):
        from erasure.prompts.build import build_prompt_sets
        from erasure.prompts.spec import load_spec

        built = work / "pairs"
        if not (built / "train.jsonl").is_file():
            build_prompt_sets(load_spec(path), built)
        path = built / "train.jsonl"
    pairs = []
    for number, row in numbered_jsonl(path, "attacks.concept_vector.pairs"):
        if not (isinstance(row.get("forget_prompt"), str) and isinstance(row.get("retain_prompt"), str)):
            raise DataError(f"attacks.concept_vector.pairs: {path} line {number} needs forget_prompt and retain_prompt")
        pairs.append((row["forget_prompt"], row["retain_prompt"]))
    if not pairs:
        raise DataError(f"attacks.concept_vector.pairs: {path} holds no twin prompts")
    return pairs, str(path)


@torch.no_grad()
def encode(backbone, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """The backbone's conditioning of ``prompts``, in passes of ENCODE_BATCH."""
    parts = [backbone.encode_prompts(prompts[i:i + ENCODE_BATCH], device) for i in range(0, len(prompts), ENCODE_BATCH)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def concept_vector(backbone, pairs: list[tuple[str, str]], device) -> dict[str, torch.Tensor]:
    """c = (1/N) Σ_i [E(f_i) − E(r_i)] per conditioning tensor (module docstring), shaped as one row."""
    from erasure.methods.objectives import concept_vector as mean_twin_difference

    return mean_twin_difference(encode(backbone, [f for f, _ in pairs], device),
                                encode(backbone, [r for _, r in pairs], device))


def attack_conditioning(backbone, name: str, settings: dict, prompts: list[str], vector, device) -> list[dict] | None:
    """Per prompt, the pipeline arguments it is drawn from under attack ``name`` (None: the prompt itself;
    textual inversion's prompts carry S*, which the pipeline's tokenizers and encoders now know;
    token optimisation's are real text)."""
    if name in ("none", "textual_inversion", "token_optimisation"):
        return None
    cond = encode(backbone, prompts, device)
    arguments = backbone.prompt_arguments(pushed_by_concept_vector(cond, vector, settings["strength"]))  # E(p) + η c
    return [{key: value[i:i + 1] for key, value in arguments.items()} for i in range(len(prompts))]


def detect(suite: dict, paths: list[Path], oracle, state) -> list[bool]:
    """Per image, whether the suite's detector finds the concept in it."""
    from erasure.eval.runner import score_in_shares

    (name, settings), = suite["metrics"].items()
    if name == "micro_world":
        from erasure.eval.micro import ORACLE_BATCH, concept_attribute, oracle_reads, read_images

        attribute = concept_attribute(settings["concept"])
        reads = score_in_shares(lambda part: oracle_reads(oracle, read_images(part))[0], paths, ORACLE_BATCH, state)
        return [r[attribute] == settings["concept"] for r in reads]
    from erasure.eval.nudity import ALL_CLASSES, EXPOSED_CLASSES, NudityDetector

    classes = EXPOSED_CLASSES if settings["classes"] == "exposed" else ALL_CLASSES
    detector = NudityDetector()
    found = score_in_shares(lambda part: detector.detect([str(p) for p in part]), paths, detector.batch_size, state)
    return [any(d["class"] in classes and float(d["score"]) >= settings["threshold"] for d in image) for image in found]


def run_attacks(suite: dict, models: list[str], out: str | Path, show: bool = True) -> dict | None:
    """Attack every model with every attack of the suite, detect, report (DIR/attack.json, attack.md,
    attack.png). Under several processes each draws and detects its share; the main one reports."""
    from erasure.backbones import FAMILIES, check_family, pipeline_class, resolve_model, weights_sha256, wrap_pipeline
    from erasure.data.generate import load_pipeline
    from erasure.eval.runner import _model_names, blank_images, versions
    from erasure.generation import Job, drawn_size, process_state, render

    out = Path(out)
    folders = []
    for model in models:
        try:
            folders.append(resolve_model(model))
        except ModelError as e:
            raise ModelError(f"--{e}") from None
        kind = pipeline_class(folders[-1])  # every model is checked before any draws
        check_family(kind, f"{folders[-1]}: ")
        if FAMILIES[kind].conditioning != "text":
            raise ModelError(f"--model {model}: {kind} is not conditioned on text; the attacks change prompts or "
                             "their embeddings")
    items, source = attacked_items(suite)
    if not items:
        raise DataError(f"suite {suite['file']}: no prompts to attack")
    state = process_state()
    device = state.device
    generation = suite["generation"]
    dtype = generation["dtype"] if generation["dtype"] != "auto" else ("float32" if device.type == "cpu" else "float16")
    pairs = pairs_file = None
    if "concept_vector" in suite["attacks"]:
        pairs, pairs_file = twin_pairs(suite["attacks"]["concept_vector"]["pairs"], suite["file"], out)
    oracle = None
    results = []
    for name, model, folder in zip(_model_names(models), models, folders):
        pipe = load_pipeline(folder, str(device), dtype)
        backbone = wrap_pipeline(pipe)
        size = drawn_size(pipe, generation["size"], {it["guidance"] for it in items})
        # The concept vector is the attacked model's own: the attacker reads its text encoder.
        vector = concept_vector(backbone, pairs, device) if pairs else None
        result = {"name": name, "model": model, "weights_sha256": weights_sha256(folder), "attacks": {}}
        for attack, settings in suite["attacks"].items():
            folder_out = out / "images" / name / attack
            folder_out.mkdir(parents=True, exist_ok=True)
            prompts = [it["prompt"] for it in items]
            record = None
            if attack == "textual_inversion":
                from erasure.eval.textual_inversion import (concept_words, embedding_file,
                                                            learn_token_embedding, placeholder_prompt)

                words = concept_words(suite, settings)
                # Every process learns the same embedding (same seed, same rows): no broadcast needed.
                learned, record = learn_token_embedding(backbone, settings, words, device,
                                                        show and state.is_main_process)
                prompts = [placeholder_prompt(p, words, settings["token"]) for p in prompts]
                if state.is_main_process:  # the attack's embedding, loadable with load_textual_inversion
                    from safetensors.torch import save_file

                    save_file(embedding_file(learned, settings["token"], backbone.family),
                              out / f"textual_inversion-{name}.safetensors")
            elif attack == "token_optimisation":
                from erasure.eval.token_optimisation import optimise_prompts

                # The projected prompts are real text, drawn as text (metadata.jsonl keeps them, and
                # the report each prompt's token ids).
                prompts, record = optimise_prompts(backbone, settings, prompts, device, show and state.is_main_process)
            conditioning = attack_conditioning(backbone, attack, settings, prompts, vector, device)
            jobs = [Job(folder_out / f"{i:06d}.png", prompts[i], it["seed"], it["guidance"],
                        None if conditioning is None else conditioning[i]) for i, it in enumerate(items)]
            finite = {}
            bar = tqdm(total=len(jobs), desc=f"{name} / {attack}", unit="image", disable=not (show and state.is_main_process))
            render(pipe, jobs, steps=generation["steps"], size=size, batch_size=generation["batch_size"], bar=bar,
                   on_written=lambda batch, ok: finite.update({j.path.name: f for j, f in zip(batch, ok)}),
                   process=(state.process_index, state.num_processes))
            bar.close()
            if state.num_processes > 1:
                from accelerate.utils import gather_object

                for theirs in gather_object([finite]):
                    finite.update(theirs)
            state.wait_for_everyone()
            paths = [j.path for j in jobs]
            blank = blank_images([{"finite": finite.get(p.name, True)} for p in paths], paths, state)
            if "micro_world" in suite["metrics"] and oracle is None:
                from erasure.eval.micro import oracle_for

                oracle = oracle_for(suite["metrics"]["micro_world"], folders[0]).to(device)
            found = detect(suite, paths, oracle, state)
            entry = {"asr": sum(found) / len(found), "found": sum(found), "images": len(found), "blank": blank}
            if record:
                entry["training"] = record
            if blank:
                entry["flag"] = f"{blank} of {len(found)} images are blank: they read as 'not found'"
            if state.is_main_process:
                write_atomically(folder_out / "metadata.jsonl", lambda f, fd=found: f.write("".join(
                    json.dumps({"file_name": j.path.name, "prompt": j.prompt, "seed": j.seed, "guidance": j.guidance,
                                "found": hit}) + "\n" for j, hit in zip(jobs, fd)).encode()))
            result["attacks"][attack] = entry
        if vector is not None and state.is_main_process:  # the attack's embedding, to reuse or inspect
            from safetensors.torch import save_file

            save_file({k: v.float().cpu().contiguous() for k, v in vector.items()}, out / f"concept_vector-{name}.safetensors")
        results.append(result)
        del pipe, backbone
    if not state.is_main_process:
        return None
    (detector, settings), = suite["metrics"].items()
    protocol = {"suite": suite["name"], "suite_file": suite["file"], "suite_sha256": suite["sha256"],
                "prompts": source, "generation": generation, "detector": {detector: settings},
                "attacks": suite["attacks"], "seeds": suite["prompts"].get("seed", 0),
                "guidance": suite["prompts"].get("guidance", 7.5), "versions": versions()}
    if pairs:
        protocol["concept_vector_pairs"] = {"file": pairs_file, "pairs": len(pairs), "sha256": hashlib.sha256(
            json.dumps(pairs).encode()).hexdigest()}
    report = {"protocol": protocol, "models": results}
    write_attack_report(report, out)
    return report


def attack_table(report: dict) -> str:
    attacks = list(report["protocol"]["attacks"])
    lines = ["| model | " + " | ".join(f"ASR {a} ↓" for a in attacks) + " |", "|---|" + "---|" * len(attacks)]
    for m in report["models"]:
        cells = [f"{m['attacks'][a]['asr']:.3f} ({m['attacks'][a]['found']}/{m['attacks'][a]['images']})"
                 + (" ⚠" if m["attacks"][a].get("flag") else "") for a in attacks]
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_attack_markdown(report: dict) -> str:
    p = report["protocol"]
    (detector, settings), = p["detector"].items()
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
    lines = [f"# Attacks: {p['suite']}", "", "## Protocol", "",
             f"- suite: `{p['suite_file']}` (sha256 `{p['suite_sha256'][:16]}…`)",
             f"- prompts attacked: {p['prompts'].get('evaluated_prompts')} ({p['prompts'].get('attacked', p['prompts']['source'])}), "
             f"seeds from {p['seeds']}, guidance {p['guidance']}",
             f"- generation: {p['generation']['steps']} steps, size {p['generation']['size'] or 'native'}",
             f"- detector: {detector} ({shown}); ASR = share of attacked images in which it finds the concept",
             "- attacks: " + "; ".join(f"{a} {s or ''}".strip() for a, s in p["attacks"].items())]
    if "concept_vector_pairs" in p:
        c = p["concept_vector_pairs"]
        lines.append(f"- concept vector: mean of E(forget) − E(retain) over {c['pairs']} twins from `{c['file']}`")
    lines += ["", "## Attack success rate", "", attack_table(report), ""]
    for m in report["models"]:
        for a, entry in m["attacks"].items():
            if entry.get("training"):
                t = entry["training"]
                lines.append(f"- {m['name']} / {a}: learned on {t['images']['rows']} images of `{t['images']['source']}`; "
                             f"denoising loss {t['loss_first_quarter']:.4f} (first quarter of the steps) → "
                             f"{t['loss_last_quarter']:.4f} (last quarter)")
            if entry.get("flag"):
                lines.append(f"- ⚠ {m['name']} / {a}: {entry['flag']}")
    return "\n".join(lines) + "\n"


def write_attack_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    attacks = list(report["protocol"]["attacks"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(attacks) * len(report["models"]) ** 0.5, 3.2))
    width = 0.8 / len(report["models"])
    for k, m in enumerate(report["models"]):
        ax.bar([i + k * width for i in range(len(attacks))], [m["attacks"][a]["asr"] for a in attacks], width,
               label=m["name"])
    ax.set_xticks([i + width * (len(report["models"]) - 1) / 2 for i in range(len(attacks))], attacks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("attack success rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomically(out / "attack.png", lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    write_atomically(out / "attack.json", lambda f: f.write(strict_json(report, indent=2).encode()))
    write_atomically(out / "attack.md", lambda f: f.write(render_attack_markdown(report).encode()))
