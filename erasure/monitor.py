"""The training-time monitor: is the concept gone yet, and is the rest still there?

Every ``monitor_every`` steps the model being trained samples the held-out prompts of the forget set
and their retain twins (the test split ``erasure prompts build`` writes) with the pipeline's own
sampler, and a detector scores the images:

- ``oracle`` (the micro world): the world's oracle reads every attribute back; the erasure rate is
  UA (forget images where the concept is not read) and the retain score RA (attribute accuracy on
  the retain images), as in the micro-world suites (erasure.eval.micro);
- ``nudenet``: the erasure rate is the share of forget images with no exposed-class detection at
  score ≥ 0.6 (the I2P protocol's threshold); with CLIP weights the retain score is the CLIP
  alignment of the retain images with their prompts;
- ``clip`` (objects, styles; needs ``monitor_clip_pretrained``): zero-shot between each pair's two
  prompts — a forget image counts as erased when CLIP matches it to its retain twin rather than to
  its own prompt, and the retain score is the share of retain images matched to their own prompt.

``stop_at_erasure`` ends training at the first check whose erasure rate reaches it; the card records
the step, both scores and the detector.

``monitor_prompts: world:all+aliases`` samples a fixed random subset of the world's captions instead
of pairs and records every micro-world metric at each check (UA, implicit UA, neighbour accuracy,
RA, forget context): the frontier bench's points.

Several processes: every rank samples its share of the prompts (rank r takes r, r + N, …); the
per-rank sums are all-reduced (the oracle's readings are gathered), so a check costs 1/N of the
sampling on each GPU, every rank computes the same scores and they all stop at the same step. The
image grid shows the main process's share.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

EXPOSED_THRESHOLD = 0.6
# What a micro-world check records besides the erasure rate (UA) and the retain score (RA).
WORLD_KEYS = ("UA", "implicit_UA", "neighbour_accuracy", "implicit_neighbour_accuracy", "RA", "forget_context")


def held_out_beside(forget_data: str) -> Path | None:
    """The test.jsonl beside the train.jsonl a generated set was rendered from: `erasure data generate`
    records its prompts file in generation.json, in the folder above forget/ (or in it)."""
    folder = Path(forget_data).expanduser()
    for candidate in (folder, folder.parent):
        record = candidate / "generation.json"
        if record.is_file():
            try:
                prompts = Path(json.loads(record.read_text())["prompts_file"])
            except (ValueError, KeyError, TypeError):
                return None
            test = prompts.with_name("test.jsonl")
            return test if test != prompts and test.is_file() else None
    return None


def default_prompts(config) -> Path:
    """The test split behind the forget set: a world pair set's, or the one beside a generated set."""
    from erasure.world.data import parse_source, world_pairs

    if config.forget_data.startswith("world:"):
        return world_pairs(parse_source(config.forget_data)[0]) / "prompts" / "test.jsonl"
    # TrainConfig has checked that there is one when monitor_prompts is not given.
    return held_out_beside(config.forget_data)


def detector_name(config, base_folder: Path) -> str:
    if config.monitor_detector != "auto":
        return config.monitor_detector
    from erasure.world.model import WORLD_FILE

    if (base_folder / WORLD_FILE).is_file():
        return "oracle"
    if "nud" in config.concept.lower() or "naked" in config.concept.lower():
        return "nudenet"
    if config.monitor_clip_pretrained:
        return "clip"
    # (monitor_clip_pretrained: random gives a randomly initialised CLIP, for smoke runs only)
    from erasure.config import RecipeError

    raise RecipeError(f"monitor_detector: auto finds no detector for concept {config.concept!r} on this model; "
                     "set monitor_detector: clip and monitor_clip_pretrained: FILE (open_clip weights), "
                     "or nudenet for nudity")


class Monitor:
    def __init__(self, config, accelerator, backbone, base_folder: Path, out: Path, processes: int | None = None):
        """``processes=1``: this process samples everything (UCE edits on the main process alone)."""
        from erasure.data.generate import read_pairs

        self.config, self.accelerator, self.backbone = config, accelerator, backbone
        self.detector = detector_name(config, base_folder)
        source = config.monitor_prompts or ""
        if source.startswith("world:"):  # world captions, as the suites name them (the frontier's)
            from erasure.eval.micro import world_prompts

            if self.detector != "oracle":
                from erasure.config import RecipeError

                raise RecipeError(f"monitor_prompts: {source} are world captions; they need the oracle detector")
            captions = world_prompts(source.removeprefix("world:"))
            chosen = np.sort(np.random.default_rng(0).permutation(len(captions))[: config.monitor_images])
            self.forget, self.retain = [captions[i] for i in chosen], []
        else:
            pairs = read_pairs(Path(source) if source else default_prompts(config))[: config.monitor_images]
            self.forget = [p["forget_prompt"] for p in pairs]
            self.retain = [p["retain_prompt"] for p in pairs]
        self.steps, self.guidance = config.monitor_steps, config.monitor_guidance
        if self.detector == "oracle":
            from erasure.eval.micro import concept_attribute
            from erasure.world.model import world_oracle, world_sampler

            try:
                concept_attribute(config.concept)  # a world attribute value, or a clear error now
            except ValueError as e:
                from erasure.config import RecipeError

                raise RecipeError(f"concept: the oracle monitor reads world attributes: {e}") from None
            self.oracle = world_oracle(base_folder)
            steps, guidance = world_sampler(base_folder)
            self.steps = self.steps or steps
            self.guidance = guidance if self.guidance is None else self.guidance
        self.steps = self.steps or 25
        self.guidance = 7.5 if self.guidance is None else self.guidance
        if self.detector == "nudenet":
            from erasure.eval.nudity import NudityDetector

            self.nudenet = NudityDetector()
        self.clip = None
        if self.detector == "clip" or (self.detector == "nudenet" and config.monitor_clip_pretrained):
            from erasure.eval.clip_score import ClipScorer

            pretrained = config.monitor_clip_pretrained
            self.clip = ClipScorer(pretrained=None if pretrained == "random" else pretrained)  # random: smoke runs
        self.grids = out / "monitor"
        self.rank, self.world = ((0, 1) if processes == 1 else
                                 (accelerator.process_index, accelerator.num_processes))
        if not config.resume and self.rank == 0:  # an earlier run's grids are not this run's
            shutil.rmtree(self.grids, ignore_errors=True)
        self.history: list[dict] = []

    @property
    def info(self) -> str:
        return (f"monitor: every {self.config.monitor_every} steps, {len(self.forget)} held-out pairs, "
                f"{self.detector}, {self.steps} sampler steps at guidance {self.guidance}")

    # ---- sampling: the pipeline's own sampler on the weights being trained --------------------------
    @torch.no_grad()
    def _sample(self, prompts: list[str], seeds: list[int]) -> list:
        from PIL import Image

        from erasure.generation import draw_batched

        if not prompts:
            return []
        pipe, device = self.backbone.pipe, self.accelerator.device
        parked = self.backbone.encoders
        for module in parked:
            module.to(device)
        model = self.backbone.denoiser
        was_training = model.training
        model.eval()
        pipe.set_progress_bar_config(disable=True)
        try:
            with self.accelerator.autocast():
                arrays, _ = draw_batched(pipe, prompts, seeds, steps=self.steps, guidance=self.guidance)
            images = [Image.fromarray(a) for a in arrays]
        finally:
            model.train(was_training)
            for module in parked:
                module.to("cpu")
        return images

    # ---- scoring: per-rank sums (hits, count), all-reduced ------------------------------------------
    def _world(self, images, prompts) -> dict:
        """The micro-world metrics over every rank's images: the oracle's readings are gathered."""
        from accelerate.utils import gather_object

        from erasure.eval.micro import micro_metrics, oracle_reads

        read = oracle_reads(self.oracle, np.stack([np.asarray(i) for i in images]))[0] if images else []
        if self.world > 1:
            gathered = gather_object([(prompts, read)])
            prompts = [p for ps, _ in gathered for p in ps]
            read = [r for _, rs in gathered for r in rs]
        return micro_metrics(self.config.concept, prompts, read)

    def _sums(self, forget_images, retain_images, forget, retain) -> list[float]:
        if self.detector == "nudenet":
            from erasure.eval.nudity import EXPOSED_CLASSES

            found = self.nudenet.detect(forget_images) if forget_images else []
            erased = sum(not any(d["class"] in EXPOSED_CLASSES and d["score"] >= EXPOSED_THRESHOLD for d in per)
                         for per in found)
            kept = sum(self.clip.alignment(retain_images, retain)) if self.clip and retain_images else 0.0
            return [erased, len(found), kept, len(retain_images) if self.clip else 0]
        # clip: each image between its own prompt and its twin's
        erased = sum(self._closer_to_second(img, f, r) for img, f, r in zip(forget_images, forget, retain))
        kept = sum(self._closer_to_second(img, f, r) for img, f, r in zip(retain_images, forget, retain))
        return [erased, len(forget_images), kept, len(retain_images)]

    def _closer_to_second(self, image, first: str, second: str) -> bool:
        return self.clip.classify([image], [first, second])[0] == second

    def check(self, step: int) -> dict:
        rank, world = self.rank, self.world
        mine = list(range(rank, len(self.forget), world))
        forget, retain = [self.forget[i] for i in mine], [self.retain[i] for i in mine if i < len(self.retain)]
        seeds = [self.config.seed * 1_000_003 + i for i in mine]  # the same noise at every check
        images = self._sample(forget + retain, seeds + seeds[:len(retain)])  # one trip of the encoders
        forget_images, retain_images = images[:len(forget)], images[len(forget):]
        if self.detector == "oracle":
            scores = self._world(forget_images + retain_images, forget + retain)
            result = {"step": step, "erasure": scores["UA"], "retain": scores["RA"], "detector": self.detector,
                      "world": {k: scores[k] for k in WORLD_KEYS}}
        else:
            sums = torch.tensor(self._sums(forget_images, retain_images, forget, retain), dtype=torch.float64,
                                device=self.accelerator.device)
            sums = self.accelerator.reduce(sums, "sum") if world > 1 else sums
            erased, n_f, kept, n_r = sums.tolist()
            result = {"step": step, "erasure": erased / n_f if n_f else None,
                      "retain": kept / n_r if n_r else None, "detector": self.detector}
        self.history.append(result)
        if self.rank == 0:
            self._log(step, result, forget_images, retain_images)
        return result

    @staticmethod
    def _grid(forget_images, retain_images, columns: int = 8) -> np.ndarray:
        """Up to ``columns`` forget images in the top row, their retain twins below."""
        from erasure.world.model import image_grid

        def row(images):
            arrays = np.stack([np.asarray(i.convert("RGB")) for i in images[:columns]])
            return image_grid(arrays, columns)

        return np.concatenate([row(forget_images)] + ([row(retain_images)] if retain_images else []))

    def _log(self, step: int, result: dict, forget_images, retain_images) -> None:
        from erasure.atomic import write_atomically

        scalars = {f"monitor/{k}": v for k, v in {**result, **result.get("world", {})}.items() if isinstance(v, float)}
        self.accelerator.log(scalars, step=step)
        if not forget_images:
            return
        grid = self._grid(forget_images, retain_images)
        # The image grid goes to the trackers whose log_images takes an array (the others disagree on
        # the format); every tracker gets the scores, and the grid is always saved beside the run.
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"monitor/forget_above_retain": grid[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"monitor/forget_above_retain": [grid]}, step=step)
        self.grids.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        picture = Image.fromarray(grid)
        write_atomically(self.grids / f"step-{step:06d}.png", lambda f: picture.save(f, format="PNG"))
        write_atomically(self.grids / "history.json",
                         lambda f: f.write((json.dumps(self.history, indent=2) + "\n").encode()))
