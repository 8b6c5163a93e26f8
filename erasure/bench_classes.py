"""Class-wise forgetting in the class and unconditional worlds: the seed papers' own settings in miniature.

``erasure bench micro-class`` is RGD's Table 1 (Ko, Li et al. 2024: class-wise forgetting on a
class-conditional CIFAR-10 model, averaged over the ten classes). In the class world (``world:class``,
a DiT whose class is the shape) each shape is forgotten in turn by every method, each from the same
data, seeds and step budget: D_f renders of the class, D_r an equal number of renders of *each*
retained class (the balanced set RGD §3 credits for its advantage). Per forgotten class the bench
samples every class from the erased model with the world's sampler and the oracle reads them:

- UA, the share of the forgotten class's samples the oracle does not read as that class;
- RA, the share of the retained classes' samples it reads as their class;
- the Fréchet distance, in the oracle's features, between the retained classes' samples and fresh
  renders of those classes (RGD's FID, with the oracle for Inception);

mean ± std over the classes. The diversity ablation (RGD Table 3) trains RGD again with D_r drawn
from the two classes nearest the forgotten one (in the oracle's features: the distance between class
means over renders) instead of from all of them, the same number of images.

``erasure bench micro-uncond`` is MSGM's setting (an unconditional model must stop generating one
class of its training data; MNIST 3 and 7 in the paper). In the unconditional world (``world:uncond``)
it reports UR, the share of samples the oracle reads as the forgotten class, before and after each
method, the Fréchet distance of the samples to renders of the retained classes, and the supplement's
Table 1 ablation: the forget term on 100 / 80 / 60 / 40 / 20 % of D_f.

Both train through ``erasure train`` in child processes (bench.train_one) from the shipped recipes
``recipes/world-class/<method>.yaml`` and ``recipes/world-uncond/<method>.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from erasure.atomic import build_atomically, write_atomically
from erasure.errors import RecipeError
from erasure.shipped import shipped

# RG is RGD on a retain set without diversity: here that is the ablation row (D_r from 2 classes).
CLASS_METHODS = ("finetune", "graddiff", "rgd", "salun", "esd-x")
UNCOND_METHODS = ("finetune", "graddiff", "rgd", "msgm-orthogonal", "msgm-obtuse", "msgm-obtuse-paper-sign")
ABLATION_METHOD = "rgd"  # RGD Table 3 ablates RGD's retain set
# RGD §3: 50 samples of each retained class; the forget set as large as the retain set here.
CLASS_BUDGET = {"forget_images": 200, "retain_per_class": 50, "images_per_class": 64}
UNCOND_BUDGET = {"forget_images": 200, "retain_per_class": 50, "images": 500}
DF_SHARES = (1.0, 0.8, 0.6, 0.4, 0.2)  # MSGM supplement, Table 1


def recipe_for(world: str, method: str) -> Path:
    path = shipped("recipes", f"world-{world}", f"{method}.yaml")
    if not path.is_file():
        have = sorted(p.stem for p in shipped("recipes", f"world-{world}").glob("*.yaml"))
        raise RecipeError(f"no recipe for {method!r} under {path.parent}; have: {', '.join(have)}")
    return path


def shape_renders(shapes: list[str], seed: int) -> np.ndarray:
    """uint8 renders, one per entry of ``shapes``: that shape, every other attribute uniformly random."""
    from erasure.world.render import ATTRIBUTES, SIZE, render

    rng = np.random.default_rng(seed)
    images = np.empty((len(shapes), SIZE, SIZE, 3), np.uint8)
    for i, shape in enumerate(shapes):
        attrs = {key: values[int(rng.integers(len(values)))] for key, values in ATTRIBUTES.items()}
        images[i] = render({**attrs, "shape": shape}, rng)
    return images


def write_render_set(folder: Path, shapes: list[str], seed: int) -> Path:
    """An image set (``metadata.jsonl`` + PNGs, erasure's folder format) of ``shape_renders``; each
    prompt is its class name. Renders are the worlds' training distribution, as CIFAR's training
    images are RGD's D_f and D_r."""
    from PIL import Image

    def build(tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (shape, image) in enumerate(zip(shapes, shape_renders(shapes, seed))):
            name = f"{i:05d}.png"
            Image.fromarray(image).save(tmp / name)
            rows.append({"file_name": name, "prompt": shape})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return build_atomically(Path(folder), build)


def class_sets(out: Path, forget: str, retained: list[str], forget_images: int, retain_images: int,
               seed: int) -> tuple[Path, Path]:
    """(D_f, D_r): ``forget_images`` renders of ``forget``; ``retain_images`` renders split equally over
    ``retained`` (balanced, in turn)."""
    forget_set = write_render_set(out / "forget", [forget] * forget_images, seed)
    retain_set = write_render_set(out / "retain", [retained[i % len(retained)] for i in range(retain_images)],
                                  seed + 1)
    return forget_set, retain_set


def class_means(oracle, classes: list[str], per_class: int = 200, seed: int = 777) -> dict[str, np.ndarray]:
    """Each class's mean oracle feature over ``per_class`` renders."""
    return {c: render_features(oracle, [c] * per_class, seed + i).mean(axis=0) for i, c in enumerate(classes)}


def nearest_classes(means: dict[str, np.ndarray], forget: str, k: int = 2) -> list[str]:
    """The ``k`` classes whose mean feature (``class_means``) lies nearest the forgotten class's."""
    others = [c for c in means if c != forget]
    return sorted(others, key=lambda c: float(np.linalg.norm(means[c] - means[forget])))[:k]


def render_features(oracle, shapes: list[str], seed: int) -> np.ndarray:
    return oracle.read(shape_renders(shapes, seed))[1].numpy()


def read_model(model: str, prompts: list[str], seed: int, steps: int, guidance: float, oracle):
    """The oracle's shape reading and features of ``model``'s samples of ``prompts`` (image i from seed + i)."""
    from erasure.backbones import resolve_model
    from erasure.data.generate import load_pipeline
    from erasure.world.model import sample

    pipe = load_pipeline(resolve_model(model), "cpu", "float32")
    images = sample(pipe, prompts, seed, steps, guidance)
    preds, features = oracle.read(images)
    return [p["shape"] for p in preds], features.numpy()


def _frechet(features: np.ndarray, reference: np.ndarray) -> float:
    from erasure.eval.micro import frechet_between

    return frechet_between(features, reference)


def _mean_std(values):
    values = [v for v in values if v is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else None


def _budget(defaults: dict, given: dict) -> dict:
    """``defaults`` updated by the counts given on the command line, each of which must be ≥ 1."""
    for key, value in given.items():
        if value is not None and value < 1:
            raise RecipeError(f"--{key.replace('_', '-')}: must be ≥ 1, got {value}")
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def _train(recipe: Path, folder: Path, overrides: dict, show: bool) -> dict:
    from erasure.bench import train_one

    if (folder / "erasure.json").is_file():  # a rerun of the bench reuses what it trained
        return {"reused": True}
    return train_one(recipe, folder, overrides, show)


def bench_micro_class(out, methods=None, classes=None, steps: int | None = None, images_per_class: int | None = None,
                      forget_images: int | None = None, retain_per_class: int | None = None,
                      ablation: bool = True, seed: int = 0, show: bool = True) -> dict:
    from erasure.world.model import shape_classes, world_oracle, world_path, world_sampler

    all_classes = list(shape_classes())
    classes = list(classes or all_classes)
    unknown = [c for c in classes if c not in all_classes]
    if unknown:
        raise RecipeError(f"--classes {', '.join(unknown)}: the class world's classes are {', '.join(all_classes)}")
    methods = list(methods or CLASS_METHODS)
    recipes = {m: recipe_for("class", m) for m in methods + ([ABLATION_METHOD] if ablation else [])}
    _budget({}, {"steps": steps})
    budget = _budget(CLASS_BUDGET, {"forget_images": forget_images, "retain_per_class": retain_per_class,
                                    "images_per_class": images_per_class})
    out = Path(out)
    world = world_path("world:class")
    oracle = world_oracle(world)
    sample_steps, guidance = world_sampler(world)
    n = budget["images_per_class"]
    prompts = [c for c in all_classes for _ in range(n)]
    reference = {c: render_features(oracle, [c] * n, 4242 + i) for i, c in enumerate(all_classes)}

    def score(model: str, forget: str) -> dict:
        read, features = read_model(model, prompts, 1000, sample_steps, guidance, oracle)
        kept = [i for i, p in enumerate(prompts) if p != forget]
        return {"UA": float(np.mean([read[i] != forget for i, p in enumerate(prompts) if p == forget])),
                "RA": float(np.mean([read[i] == prompts[i] for i in kept])),
                "frechet": _frechet(features[kept], np.concatenate([reference[c] for c in all_classes if c != forget]))}

    overrides = {"max_steps": steps} if steps else {}
    ablated = f"{ABLATION_METHOD} (D_r: 2 nearest classes)"
    rows = {m: [] for m in ["base"] + methods + ([ablated] if ablation else [])}
    means = class_means(oracle, all_classes) if ablation else {}
    for forget in classes:
        retained = [c for c in all_classes if c != forget]
        retain_images = budget["retain_per_class"] * len(retained)
        data = out / "data" / forget
        d_f, d_r = class_sets(data / "all", forget, retained, budget["forget_images"], retain_images, seed)
        rows["base"].append({"class": forget, **score("world:class", forget)})
        runs = [(m, m, d_r, m) for m in methods]  # row, recipe, D_r, model folder
        if ablation:
            near = nearest_classes(means, forget)
            _, d_near = class_sets(data / "nearest", forget, near, budget["forget_images"], retain_images, seed)
            runs.append((ablated, ABLATION_METHOD, d_near, f"{ABLATION_METHOD}-nearest"))
        for name, method, retain, folder_name in runs:
            if show:
                print(f"\n== forgetting {forget}: {name}", flush=True)
            folder = out / "models" / forget / folder_name
            cost = _train(recipes[method], folder, {"concept": forget, "forget_data": str(d_f),
                                                    "retain_data": str(retain), "seed": seed, **overrides}, show)
            rows[name].append({"class": forget, **score(str(folder), forget), "wall_s": cost.get("wall_s")})
    result = {"world": "world:class", "classes": classes, "steps": steps, "budget": budget, "seed": seed,
              "sampler": {"steps": sample_steps, "guidance": guidance},
              "rows": {name: {"per_class": per, **{k: _mean_std([r[k] for r in per]) for k in ("UA", "RA", "frechet")}}
                       for name, per in rows.items()}}
    _write(out, "micro-class", result, class_table(result))
    class_plot(result, out / "micro-class.png")
    return result


def bench_micro_uncond(out, forget: str = "triangle", methods=None, steps: int | None = None,
                       images: int | None = None, forget_images: int | None = None,
                       retain_per_class: int | None = None, shares=DF_SHARES, share_method: str = "msgm-orthogonal",
                       seed: int = 0, show: bool = True) -> dict:
    from erasure.world.model import shape_classes, world_oracle, world_path, world_sampler

    all_classes = list(shape_classes())
    if forget not in all_classes:
        raise RecipeError(f"--forget {forget!r}: the unconditional world's classes are {', '.join(all_classes)}")
    methods = list(methods or UNCOND_METHODS)
    recipes = {m: recipe_for("uncond", m) for m in methods + ([share_method] if shares else [])}
    _budget({}, {"steps": steps})
    budget = _budget(UNCOND_BUDGET, {"forget_images": forget_images, "images": images,
                                     "retain_per_class": retain_per_class})
    bad = [s for s in shares or () if not 0 < s <= 1]
    if bad:
        raise RecipeError(f"--shares {bad}: each share of D_f must lie in (0, 1]")
    out = Path(out)
    world = world_path("world:uncond")
    oracle = world_oracle(world)
    sample_steps, guidance = world_sampler(world)
    retained = [c for c in all_classes if c != forget]
    reference = render_features(oracle, [retained[i % len(retained)] for i in range(budget["images"])], 4242)
    prompts = [""] * budget["images"]  # an unconditional model reads no prompt

    def score(model: str) -> dict:
        read, features = read_model(model, prompts, 1000, sample_steps, guidance, oracle)
        return {"UR": float(np.mean([r == forget for r in read])),
                "frequency": {c: float(np.mean([r == c for r in read])) for c in all_classes},
                "frechet_to_retained": _frechet(features, reference)}

    d_f, d_r = class_sets(out / "data" / "all", forget, retained, budget["forget_images"],
                          budget["retain_per_class"] * len(retained), seed)
    overrides = {"concept": forget, "retain_data": str(d_r), "seed": seed, **({"max_steps": steps} if steps else {})}
    rows = {"base": score("world:uncond")}
    for method in methods:
        if show:
            print(f"\n== forgetting {forget}: {method}", flush=True)
        folder = out / "models" / method
        cost = _train(recipes[method], folder, {**overrides, "forget_data": str(d_f)}, show)
        rows[method] = {**score(str(folder)), "wall_s": cost.get("wall_s")}
    share_rows = {}
    for share in shares or ():
        if share == 1 and share_method in rows:  # the whole of D_f: the method's own row
            share_rows["1"] = {k: v for k, v in rows[share_method].items() if k != "wall_s"}
            continue
        # The first ⌈share · |D_f|⌉ renders: a smaller forget set, the same retain set and budget.
        count = max(1, int(np.ceil(share * budget["forget_images"])))
        part = write_render_set(out / "data" / f"forget-{share:g}", [forget] * count, seed)
        if show:
            print(f"\n== {share_method} on {share:.0%} of D_f", flush=True)
        folder = out / "models" / f"{share_method}-df{share:g}"
        _train(recipes[share_method], folder, {**overrides, "forget_data": str(part)}, show)
        share_rows[f"{share:g}"] = score(str(folder))
    result = {"world": "world:uncond", "forget": forget, "steps": steps, "budget": budget, "seed": seed,
              "sampler": {"steps": sample_steps, "guidance": guidance}, "rows": rows,
              "df_share_method": share_method, "df_shares": share_rows}
    _write(out, "micro-uncond", result, uncond_table(result))
    return result


def _write(out: Path, name: str, result: dict, table: str) -> None:
    write_atomically(out / f"{name}.json", lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    write_atomically(out / f"{name}.md", lambda f: f.write((table + "\n").encode()))


def _pm(cell, digits=3) -> str:
    return "—" if cell is None else f"{cell[0]:.{digits}f} ± {cell[1]:.{digits}f}"


def class_table(result: dict) -> str:
    lines = ["| method | UA ↑ | RA ↑ | Fréchet (oracle) ↓ |", "|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {_pm(row['UA'])} | {_pm(row['RA'])} | {_pm(row['frechet'], 2)} |")
    return "\n".join(lines)


def uncond_table(result: dict) -> str:
    lines = [f"| method | UR ({result['forget']}) ↓ | Fréchet to retained renders ↓ |", "|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['UR']:.3f} | {row['frechet_to_retained']:.2f} |")
    if result["df_shares"]:
        lines += ["", f"| share of D_f ({result['df_share_method']}) | UR ↓ | Fréchet to retained renders ↓ |",
                  "|---|---|---|"]
        for share, row in result["df_shares"].items():
            lines.append(f"| {float(share):.0%} | {row['UR']:.3f} | {row['frechet_to_retained']:.2f} |")
    return "\n".join(lines)


def class_plot(result: dict, path: Path) -> None:
    """UA against RA per method: one small point per forgotten class, a large one for the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.8))
    for name, row in result["rows"].items():
        per = row["per_class"]
        dots = ax.scatter([r["RA"] for r in per], [r["UA"] for r in per], s=12, alpha=0.5)
        ax.scatter(row["RA"][0], row["UA"][0], s=60, color=dots.get_facecolor()[0], edgecolors="black", label=name)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("RA (retained classes drawn) ↑")
    ax.set_ylabel("UA (forgotten class gone) ↑")
    ax.set_title("class world: each class forgotten in turn\n(small: per class, large: mean)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
