"""`erasure eval`: generate a suite's images with every model, score them, write the report.

Images are saved with their prompt and seed (DIR/images/<model>/, metadata.jsonl) and written
atomically, so an interrupted evaluation resumes where it stopped. Raw NudeNet detections are kept
per image (nudenet.jsonl), so counts can be redone at another threshold without the detector.

Metrics, with the direction that is better and how they aggregate:
- nudenet: detections per exposed class at the threshold (lower is better, summed over images) and
  the share of images with any (lower is better).
- clip_alignment: cosine of image and prompt embeddings (higher is better, mean over images); Δ to
  the first model.
- class_forgetting: UA = 1 − accuracy on the erased class (higher is better), RA = accuracy on the
  others (higher is better), by zero-shot CLIP.
- fid: Fréchet distance to the reference images (lower is better).
- micro_world: UA, neighbour accuracy, RA and forget context read by the micro world's oracle (all
  higher is better) and the Fréchet distance to the first model in the oracle's features (lower is
  better); definitions in erasure.eval.micro.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from erasure.atomic import write_atomically
from erasure.data.generate import load_pipeline
from erasure.generation import Job, drawn_size, process_state, render
from erasure.backbones import weights_sha256
from erasure.data.paired import numbered_jsonl
from erasure.errors import DataError, ModelError


def suite_items(suite: dict) -> tuple[list[dict], dict]:
    """The prompts to render: [{prompt, seed, guidance, label?}], and a description of the source."""
    p, generation = suite["prompts"], suite["generation"]
    fixed_seed = p.get("seed", 0)
    fixed_guidance = p.get("guidance", 7.5)
    if p.get("i2p"):
        from erasure.eval.i2p import load_i2p

        rows, info = load_i2p(str(p["i2p"]), p.get("filter", "nudity"))
        items = [{"prompt": r["prompt"], "row": r["row"],
                  "seed": r["seed"] if fixed_seed == "dataset" and r["seed"] is not None else
                  (int(fixed_seed) if fixed_seed != "dataset" else r["row"]),
                  "guidance": r["guidance"] if fixed_guidance == "dataset" and r["guidance"] else
                  (float(fixed_guidance) if fixed_guidance != "dataset" else 7.5)} for r in rows]
        info = {"source": "i2p", "dataset": str(p["i2p"]), **info}
    elif p.get("prompt_set"):
        path = Path(p["prompt_set"])
        if not path.is_file():
            raise DataError(f"prompts.prompt_set: {path} does not exist (build it with `erasure prompts build`)")
        side = p.get("side", "retain")
        column = f"{side}_prompt"
        items = []
        for number, row in numbered_jsonl(path, "prompts.prompt_set"):
            if not isinstance(row.get(column), str):
                raise DataError(f"prompts.prompt_set: {path} line {number} has no text column {column!r}")
            items.append({"prompt": row[column], "seed": int(fixed_seed) + len(items),
                          "guidance": float(fixed_guidance)})
        info = {"source": "prompt_set", "file": str(path), "side": side, "kept": len(items)}
    elif p.get("world"):
        from erasure.eval.micro import world_prompts

        items = [{"prompt": prompt, "seed": int(fixed_seed) + i, "guidance": float(fixed_guidance)}
                 for i, prompt in enumerate(world_prompts(p["world"]))]
        info = {"source": "world", "captions": p["world"]}
    else:
        template = p.get("template", "a photo of a {}")
        items = [{"prompt": template.format(c), "label": c, "seed": int(fixed_seed) + i,
                  "guidance": float(fixed_guidance)} for i, c in enumerate(p["classes"])]
        info = {"source": "classes", "classes": list(p["classes"]), "template": template}
    if p.get("limit"):
        items = items[: int(p["limit"])]
    info["evaluated_prompts"] = len(items)
    info["images_per_prompt"] = generation["images_per_prompt"]
    return items, info


def _readable(path: Path) -> bool:
    """An image that exists and decodes; anything else (a file damaged outside our atomic writes) is
    rendered again rather than handed to the scorers."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        return False


def _identity(folder: Path, generation: dict, dtype: str, device: str) -> dict:
    """What, besides each image's prompt, seed and guidance, decides its pixels."""
    return {"weights_sha256": weights_sha256(folder), "steps": generation["steps"],
            "requested_size": generation["size"], "dtype": dtype, "device": device}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def generate_images(model: str, items: list[dict], generation: dict, out: Path, show: bool = True,
                    state=None) -> tuple[list[dict], dict]:
    """Render every item's images (resuming); returns one record per image and the sampler used.

    A folder's images are reused only when they are this model's: the weights (by hash) and the
    sampler settings recorded in generation.json must match, and each image's prompt, seed and
    guidance in metadata.jsonl. Anything else is rendered again. generation.json is written before
    the first image and metadata.jsonl after every batch, so each image on disk is described.
    Under several processes each draws its share of the batches; the main process keeps the records."""
    from erasure.backbones import resolve_model

    state = state or process_state()
    main = state.is_main_process
    folder = resolve_model(model)
    device = state.device
    dtype = generation["dtype"]
    if dtype == "auto":
        dtype = "float32" if device.type == "cpu" else "float16"
    identity = _identity(folder, generation, dtype, device.type)
    run_file, index = out / "generation.json", out / "metadata.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    run = _read_json(run_file)
    stale = not isinstance(run, dict) or {k: run.get(k) for k in identity} != identity
    state.wait_for_everyone()  # every process has read the records before the main one changes them
    if stale:
        if main:
            if run is not None or any(out.iterdir()):
                changed = [k for k in identity if not isinstance(run, dict) or run.get(k) != identity[k]]
                print(f"{out}: images made by other weights or settings ({', '.join(changed)}); rendering them again")
            for old in out.iterdir():
                if old.is_file():
                    old.unlink()
        run = None
    state.wait_for_everyone()
    made = {}
    if run is not None and index.is_file():
        made = {r["file_name"]: r for r in _jsonl_objects(index)}
    k_max = generation["images_per_prompt"]
    records = [{"file_name": f"{i:06d}_{k}.png", "prompt": it["prompt"], "seed": it["seed"] + k,
                "guidance": it["guidance"], **({"label": it["label"]} if "label" in it else {})}
               for i, it in enumerate(items) for k in range(k_max)]

    def same(record):
        kept = made.get(record["file_name"])
        return kept is not None and {k: v for k, v in kept.items() if k != "finite"} == record

    todo = [r for r in records if not (same(r) and _readable(out / r["file_name"]))]
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=f"generating {out.name}",
               unit="image", disable=not (show and main))
    pipe = None
    if todo:
        pipe = load_pipeline(folder, str(device), dtype)
        run = {**identity, "folder": str(folder), "sampler": type(pipe.scheduler).__name__,
               "size": drawn_size(pipe, generation["size"], {r["guidance"] for r in todo})}
        if main:
            write_atomically(run_file, lambda f: f.write(json.dumps(run).encode()))
    state.wait_for_everyone()
    # I2P's per-prompt guidance scales split the batches (erasure.generation.render).
    by_path = {out / r["file_name"]: r for r in todo}
    mine = {}

    def record(batch, finite):
        for job, ok in zip(batch, finite):
            mine[job.path.name] = made[job.path.name] = {**by_path[job.path], "finite": ok}
        if main:
            _write_index(index, made)

    render(pipe, [Job(out / r["file_name"], r["prompt"], r["seed"], r["guidance"]) for r in todo],
           steps=generation["steps"], size=run["size"], batch_size=generation["batch_size"], bar=bar,
           on_written=record, process=(state.process_index, state.num_processes))
    bar.close()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        for theirs in gather_object([mine]):
            made.update(theirs)
        if run is None:  # nothing to render here, but another process may have: read what it wrote
            run = _read_json(run_file)
    records = [made[r["file_name"]] for r in records]
    if main:
        _write_index(index, {r["file_name"]: r for r in records})
    state.wait_for_everyone()
    return records, run


def _jsonl_objects(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # an index line we cannot read: its image is rendered again
        if isinstance(row, dict) and "file_name" in row:
            rows.append(row)
    return rows


def _write_index(path: Path, made: dict) -> None:
    text = "".join(json.dumps(made[name]) + "\n" for name in sorted(made))
    write_atomically(path, lambda f: f.write(text.encode()))


def score_in_shares(score, items: list, chunk: int, state) -> list:
    """``score(part)``, one result per item of ``part``, for every item of ``items``, in their order,
    on every process.

    The parts (``chunk`` items each, a scorer's own batch) are formed over all items and dealt out in
    turn, as `erasure.generation.render` deals batches: a scorer sees the same batches whatever the
    number of processes, so its batched kernels round alike and N processes score to the bit what one
    does. Every process takes part in the gathering, even with no part of its own."""
    parts = [items[start:start + chunk] for start in range(0, len(items), chunk)]
    mine = {}
    for number in range(state.process_index, len(parts), state.num_processes):
        results = list(score(parts[number]))
        if len(results) != len(parts[number]):  # a scorer that drops images would shift every later one
            raise RuntimeError(f"a scorer returned {len(results)} results for {len(parts[number])} images")
        mine[number] = results
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        for theirs in gather_object([mine]):
            mine.update(theirs)
    return [result for number in range(len(parts)) for result in mine[number]]


def blank_images(records: list[dict], paths: list[Path], state) -> int:
    """Images that are not pictures: non-finite pixels at generation, or one flat colour."""
    import numpy as np
    from PIL import Image

    def blank(part):
        for record, path in part:
            if not record.get("finite", True):
                yield True
                continue
            with Image.open(path) as image:
                pixels = np.asarray(image)
            yield bool(pixels.min() == pixels.max())

    return sum(score_in_shares(blank, list(zip(records, paths)), 64, state))  # 64: any part size reads alike


def score_nudenet(settings: dict, paths: list[Path], out: Path, state) -> dict:
    from erasure.eval.nudity import ALL_CLASSES, EXPOSED_CLASSES, NudityDetector, count_detections

    # Detections are kept per image, keyed by the image's bytes: a re-rendered image is detected again.
    # Every process reads the record before the gathering, and the main one rewrites it only after.
    record = out / "nudenet.jsonl"
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    kept = {r.get("sha256"): r.get("detections") for r in _jsonl_objects(record)} if record.is_file() else {}
    missing = [i for i, d in enumerate(digests) if not isinstance(kept.get(d), list)]
    detector = NudityDetector() if missing else None  # a folder detected before needs no detector
    found = score_in_shares(lambda part: detector.detect([str(paths[i]) for i in part]), missing,
                            detector.batch_size if detector else 1, state)
    kept.update({digests[i]: d for i, d in zip(missing, found)})
    detections = [kept[d] for d in digests]
    if state.is_main_process:
        write_atomically(record, lambda f: f.write("".join(
            json.dumps({"file_name": p.name, "sha256": h, "detections": d}) + "\n"
            for p, h, d in zip(paths, digests, detections)).encode()))
    classes = EXPOSED_CLASSES if settings["classes"] == "exposed" else ALL_CLASSES
    return count_detections(detections, settings["threshold"], classes)


def _clip(settings: dict, state):
    from erasure.eval.clip_score import ClipScorer

    try:
        return ClipScorer(settings["model"], settings["pretrained"], device=str(state.device))
    except (RuntimeError, FileNotFoundError) as e:  # weights not cached offline, or a missing file
        raise DataError(f"CLIP weights: {e}") from None


def score_alignment(scorer, settings: dict, paths: list[Path], prompts: list[str], state) -> dict:
    from erasure.eval.clip_score import heim_score

    scores = score_in_shares(lambda part: scorer.alignment([str(p) for p, _ in part], [q for _, q in part]),
                             list(zip(paths, prompts)), scorer.batch_size, state)
    if settings["variant"] == "heim":
        scores = [heim_score(s) for s in scores]
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1)) ** 0.5
    return {"mean": mean, "std": std, "sem": std / len(scores) ** 0.5, "n": len(scores),
            "variant": settings["variant"], "model": settings["model"], "pretrained": settings["pretrained"]}


def score_class_forgetting(scorer, settings: dict, paths: list[Path], labels: list[str], classes: list[str],
                           state) -> dict:
    from erasure.eval.clip_score import forgetting_accuracy

    predicted = score_in_shares(
        lambda part: scorer.classify([str(p) for p in part], classes, settings["template"],
                                     tuple(settings["extra_labels"])),
        paths, scorer.batch_size, state)
    return {**forgetting_accuracy(predicted, labels, settings["erased"]), "erased": settings["erased"]}


def score_fid(settings: dict, paths: list[Path], reference: dict, state) -> dict:
    """FID of ``paths`` against the suite's reference folder. ``reference`` caches the Inception network
    and the reference statistics, which are the same for every model of a run. The reference images
    are shared out like the generated ones: each process reads its part once, and no process waits
    on one that reads them all."""
    import numpy as np
    from PIL import UnidentifiedImageError

    from erasure.eval.fid import InceptionFeatures, frechet_distance, image_folder, image_statistics

    def features(images):
        network = reference["features"]
        return np.stack(score_in_shares(lambda part: list(network(part)), images, network.batch_size, state))

    try:
        if not reference:
            files = image_folder(settings["reference"])
            reference.update(features=InceptionFeatures(settings["weights"], device=state.device),
                             images=len(files))
            reference["statistics"] = image_statistics([str(p) for p in files], features)
        value = frechet_distance(*image_statistics([str(p) for p in paths], features), *reference["statistics"])
    except (FileNotFoundError, NotADirectoryError) as e:  # missing reference images or Inception weights
        raise DataError(f"metrics.fid: {e}") from None
    except (UnidentifiedImageError, OSError) as e:  # PIL names the file it could not read
        raise DataError(f"metrics.fid: {e}") from None
    return {"fid": value, "reference": str(settings["reference"]), "reference_images": reference["images"]}


def score_micro_world(oracle, settings: dict, paths: list[Path], prompts: list[str], state) -> tuple:
    """The micro-world metrics of the images at ``paths`` and the oracle's features of them (N×D, for
    the Fréchet distance to the first model)."""
    import numpy as np

    from erasure.eval.micro import ORACLE_BATCH, micro_metrics, oracle_reads, read_images

    readings = score_in_shares(lambda part: zip(*oracle_reads(oracle, read_images(part))), paths, ORACLE_BATCH,
                               state)
    return micro_metrics(settings["concept"], prompts, [r for r, _ in readings]), np.stack([h for _, h in readings])


def versions() -> dict:
    from erasure.export import versions as installed

    return installed(("erasure", "torch", "diffusers", "nudenet", "open_clip_torch", "onnxruntime"))


def evaluate(suite: dict, models: list[str], out: str | Path, show: bool = True) -> dict | None:
    """Generate, score and report; returns the report dict (also DIR/report.json, report.md, *.png).
    Under several processes every one draws and scores its share of the images, and the main process
    writes the report (the others return None)."""
    from erasure.eval.report import write_report

    from erasure.backbones import resolve_model

    out = Path(out)
    for model in models:  # every model is found before minutes of generation start
        try:
            resolve_model(model)
        except ModelError as e:
            raise ModelError(f"--{e}") from None
    items, source = suite_items(suite)
    if not items:
        raise DataError(f"suite {suite['file']}: no prompts to evaluate")
    names = _model_names(models)
    state = process_state()
    results = []
    scorers, oracle, reference, fid_reference = {}, None, None, {}
    for name, model in zip(names, models):
        folder_out = out / "images" / name
        records, run = generate_images(model, items, suite["generation"], folder_out, show, state)
        # Every process scores its share of the images and gets every result: they all walk the same
        # branches, so their gatherings pair up; the main one alone writes.
        paths = [folder_out / r["file_name"] for r in records]
        metrics = {}
        blank = blank_images(records, paths, state)
        result = {"name": name, "model": model, "weights_sha256": run["weights_sha256"], "sampler": run["sampler"],
                  "size": run["size"], "dtype": run["dtype"], "blank_images": blank, "metrics": metrics}
        results.append(result)
        if blank == len(records):
            # A diverged model draws NaN, saved as black: every detector reads that as a perfect erasure.
            result["flag"] = (f"all {blank} images are blank (non-finite or one flat colour): the model is broken, "
                              "not scored")
            continue
        if blank:
            result["flag"] = f"{blank} of {len(records)} images are blank (non-finite or one flat colour)"
        for metric, settings in suite["metrics"].items():
            if metric == "nudenet":
                metrics[metric] = score_nudenet(settings, paths, folder_out, state)
            elif metric in ("clip_alignment", "class_forgetting"):
                # one scorer per CLIP checkpoint: the two metrics may name different ones
                key = (settings["model"], settings["pretrained"])
                clip = scorers[key] = scorers.get(key) or _clip(settings, state)
                metrics[metric] = (score_alignment(clip, settings, paths, [r["prompt"] for r in records], state)
                                   if metric == "clip_alignment" else
                                   score_class_forgetting(clip, settings, paths, [r["label"] for r in records],
                                                          list(suite["prompts"]["classes"]), state))
            elif metric == "fid":
                metrics[metric] = score_fid(settings, paths, fid_reference, state)
            elif metric == "micro_world":
                from erasure.eval.micro import frechet_between, oracle_for

                # One oracle reads every model (the first model's world's): an export carries no oracle.
                oracle = oracle or oracle_for(settings, Path(run["folder"])).to(state.device)
                metrics[metric], features = score_micro_world(oracle, settings, paths,
                                                              [r["prompt"] for r in records], state)
                reference = features if reference is None else reference
                metrics[metric]["frechet_to_first"] = frechet_between(features, reference)
    if not state.is_main_process:
        return None
    if "clip_alignment" in suite["metrics"] and "clip_alignment" in results[0]["metrics"]:
        first = results[0]["metrics"]["clip_alignment"]["mean"]
        for r in results:
            if "clip_alignment" in r["metrics"]:
                r["metrics"]["clip_alignment"]["delta_to_first"] = r["metrics"]["clip_alignment"]["mean"] - first
    report = {"protocol": {"suite": suite["name"], "suite_file": suite["file"], "suite_sha256": suite["sha256"],
                           "prompts": source, "generation": suite["generation"], "metrics": suite["metrics"],
                           "seeds": suite["prompts"].get("seed", 0), "guidance": suite["prompts"].get("guidance", 7.5),
                           "versions": versions()},
              "models": results}
    write_report(report, out)
    return report


def _model_names(models: list[str]) -> list[str]:
    names = []
    for i, model in enumerate(models):
        stem = Path(model.rstrip("/")).name.replace(":", "-") or "model"
        names.append(f"{i}-{stem}")
    return names
