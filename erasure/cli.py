"""The `erasure` command: prompts, data, train, eval, attack, report, push; tiny, world, bench, demo."""

from __future__ import annotations

import sys
from pathlib import Path

from erasure.cli_parser import Parser
from erasure.errors import ErasureError, RecipeError, one_line
from erasure.world.data import CONCEPTS as WORLD_CONCEPTS

# The main job: the recommended recipe (recipes/world/erase.yaml) on the world concept "striped".
DEMO_CONCEPT = "striped"
DEMO_PROMPTS = ["a red striped circle on a black background", "a blue striped square on a white background",
                "a yellow dotted triangle on a navy background", "a green checkered cross on a gray background"]


def _tiny(args) -> None:
    from erasure.tiny import TINY_BUILDERS

    TINY_BUILDERS[args.family](Path(args.dir), seed=args.seed)
    print(f"wrote a tiny {args.family} pipeline to {args.dir}")


def _demo(args) -> None:
    """The main job: erase "striped" from the shipped micro world with the recommended recipe,
    recipes/world/erase.yaml (concept and data as flags, as for any world concept), evaluate base
    against erased with the world's oracle, export, load the export back, sample."""
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from erasure.bench import RECOMMENDED, concept_flags, recipe_path
    from erasure.config import TrainConfig, read_recipe
    from erasure.eval.report import tables
    from erasure.eval.runner import evaluate
    from erasure.eval.suite import load_suite
    from erasure.shipped import shipped
    from erasure.trainer import train
    from erasure.world.model import sample, world_path, world_sampler

    out = Path(args.out).resolve()
    base = world_path()
    print(f"base model: the micro world shipped at {base} (erasure world build reproduces it)")
    config = TrainConfig(**{**read_recipe(recipe_path(DEMO_CONCEPT, RECOMMENDED)),
                            **concept_flags(DEMO_CONCEPT, RECOMMENDED), "output_dir": str(out), "report_to": "none",
                            **({"max_steps": args.steps} if args.steps else {})})
    train(config)
    suite = load_suite(shipped("eval", f"micro-{DEMO_CONCEPT}.yaml"), {"prompts": {"limit": args.limit}} if args.limit else {})
    print(f"\nevaluating base and erased model on {args.limit or 'all 960'} world captions, 480 named and 480 by "
          "alias (oracle read-back)…")
    report = evaluate(suite, ["world:micro", str(out)], out / "eval")
    erased = DiffusionPipeline.from_pretrained(out)  # what a user of the export does
    original = DiffusionPipeline.from_pretrained(base)
    steps, guidance = world_sampler(base)
    rows = []
    for pipe in (original, erased):
        pipe.set_progress_bar_config(disable=True)
        rows.append(np.concatenate(list(sample(pipe, DEMO_PROMPTS, seed=0, steps=steps, guidance_scale=guidance)),
                                   axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    samples = out / "samples.png"
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(samples)
    print("\n".join(tables(report)))
    print("\nwhere everything went:")
    print(f"  erased pipeline  {out}  (DiffusionPipeline.from_pretrained loads it)")
    print(f"  erasure card     {out / 'README.md'}, {out / 'erasure.json'}")
    print(f"  evaluation       {out / 'eval' / 'report.md'} (+ micro_world.png)")
    print(f"  samples          {samples} (top: base, bottom: erased; {'; '.join(DEMO_PROMPTS)})")


def _prompts_build(args) -> None:
    from erasure.prompts.build import build_prompt_sets, stats_table
    from erasure.prompts.spec import load_spec

    spec = load_spec(args.spec, seed=args.seed)
    out = Path(args.out)
    if args.llm:
        from erasure.prompts.expand import expand_spec
        from erasure.prompts.llm import make_client

        client = make_client(args.llm, base_url=args.base_url, model=args.llm_model,
                             api_key_env=args.api_key_env, timeout=args.timeout, retries=args.llm_retries,
                             json_object=not args.no_llm_json)
        out.mkdir(parents=True, exist_ok=True)
        # Accepted proposals are kept in llm_expansion.json as they arrive: a failed or interrupted
        # run keeps them, and a rerun asks only for what is missing.
        spec = expand_spec(spec, client, per_dimension=args.per_dimension, paraphrases=args.paraphrases,
                           max_retries=args.max_retries, state_file=out / "llm_expansion.json", seed=args.seed)
    stats = build_prompt_sets(spec, out, seed=args.seed, n_train=args.train, n_test=args.test,
                              uniform=args.uniform)
    print(f"{stats['mode']} prompt pairs for {spec.concept!r} → {out}/train.jsonl, test.jsonl, stats.json")
    print(stats_table(stats))


def _data_generate(args) -> None:
    from erasure.data.generate import generate_pairs

    out = generate_pairs(args.prompts, args.model, args.out, steps=args.steps, guidance=args.guidance,
                         size=args.size, batch_size=args.batch_size, seed=args.seed,
                         images_per_prompt=args.images_per_prompt, limit=args.limit, dtype=args.dtype)
    print(f"paired images → {out}/forget and {out}/retain (use them as forget_data / retain_data)")


def _attack(args) -> None:
    from erasure.errors import SuiteError
    from erasure.eval.attack import attack_table, load_attack_suite, run_attacks

    overrides = {"prompts": {}, "generation": {}}
    if args.dataset:
        overrides["prompts"]["i2p"] = args.dataset
    if args.limit is not None:
        overrides["prompts"]["limit"] = args.limit
    for key in ("steps", "batch_size", "size"):
        if getattr(args, key) is not None:
            overrides["generation"][key] = getattr(args, key)
    if args.strength is not None:
        if "concept_vector" not in load_attack_suite(args.suite)["attacks"]:
            raise SuiteError(f"--strength: suite {args.suite} has no concept_vector attack to set it for")
        overrides["attacks"] = {"concept_vector": {"strength": args.strength}}
    suite = load_attack_suite(args.suite, overrides)
    report = run_attacks(suite, args.model, args.out)
    if report is not None:  # the main process reports
        print(attack_table(report))
        print(f"report: {args.out}/attack.md")


def _eval(args) -> None:
    from erasure.eval.runner import evaluate
    from erasure.eval.suite import load_suite

    metrics = load_suite(args.suite)["metrics"]
    overrides = {"prompts": {}, "generation": {}, "metrics": {}}
    if args.dataset:
        overrides["prompts"]["i2p"] = args.dataset
    if args.prompt_set:
        overrides["prompts"]["prompt_set"] = args.prompt_set
    if args.limit is not None:
        overrides["prompts"]["limit"] = args.limit
    for key in ("steps", "images_per_prompt", "batch_size", "size"):
        if getattr(args, key) is not None:
            overrides["generation"][key] = getattr(args, key)
    for name in ("clip_alignment", "class_forgetting"):
        if name in metrics:
            overrides["metrics"][name] = {k: v for k, v in (("model", args.clip_model),
                                                             ("pretrained", args.clip_pretrained)) if v}
            if args.clip_pretrained == "random":
                overrides["metrics"][name]["pretrained"] = None
    if "fid" in metrics:
        overrides["metrics"]["fid"] = {k: v for k, v in (("weights", args.inception_weights),
                                                         ("reference", args.fid_reference)) if v}
    suite = load_suite(args.suite, overrides)
    report = evaluate(suite, args.model, args.out)
    if report is None:  # another process than the main one: it drew its share, the main one reports
        return
    from erasure.eval.report import tables

    print("\n".join(tables(report)))
    print(f"\nreport → {args.out}/report.md, report.json" + "".join(f", {p}" for p in report["plots"]))


def _report(args) -> None:
    from erasure.eval.report import load_report, side_by_side

    table = side_by_side([load_report(folder) for folder in args.dirs])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def _push(args) -> None:
    from erasure.eval.report import load_report
    from erasure.hub import push_export

    report = load_report(args.report) if args.report else None
    print(f"pushed {args.dir} to {push_export(args.dir, args.hub_model_id, args.private, report)}")


def main(argv: list[str] | None = None) -> None:
    """Bad input (erasure.errors.ErasureError: a recipe, spec, suite, data set, model, output folder
    or LLM answer that is wrong, or a run that diverged) ends with one line and exit status 2, not a
    traceback; anything else is a bug and keeps its traceback."""
    try:
        _main(argv)
    except ErasureError as e:
        print(f"erasure: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: keep the traceback
            raise
        # a folder that is a file, a disk that is full, a path not writable: the user's to fix
        target = f"{e.filename}" + (f" → {e.filename2}" if e.filename2 else "")
        print(f"erasure: error: {target}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


def _bench_micro(args) -> None:
    from erasure.bench import bench_micro, bench_table

    out = Path(args.out or f"bench-micro-{args.concept}{'-frontier' if args.frontier else ''}")
    if args.limit is not None and args.limit < 1:  # before any training, on either path
        raise RecipeError(f"--limit: must be ≥ 1, got {args.limit}")
    if args.frontier:
        from erasure.bench import bench_frontier, frontier_table
        from erasure.shipped import shipped

        if args.limit is not None and not args.attack:
            raise RecipeError("--limit: with --frontier it limits the attacked captions (add --attack); the "
                              "frontier's checks take --images")
        attack = None
        if args.attack:
            attack = shipped("eval", f"attack-micro-{args.concept}.yaml") if args.attack == "shipped" else args.attack
        try:
            result = bench_frontier(args.concept, out, methods=args.methods, steps=args.steps, every=args.every,
                                    images=args.images, seeds=args.seeds, attack=attack, limit=args.limit)
        except ErasureError:
            raise
        except ValueError as e:
            raise RecipeError(str(e)) from None
        print(f"\nmicro world, erasing {args.concept!r}: retention at erasure (mean ± std over seeds)\n")
        print(frontier_table(result))
        print(f"\n→ {out / 'frontier.md'}, {out / 'frontier.json'}, {out / 'frontier.png'}")
        if "attack" in result:
            from erasure.bench import frontier_attack_table

            print(f"\nattacks at each method's erasure point:\n\n{frontier_attack_table(result)}")
            print(f"\n→ {out / 'frontier-attack.md'}, {out / 'frontier-attack.png'}; attack report in {out / 'attack'}")
        return
    if args.attack:
        raise RecipeError("--attack: attacks each method at its erasure point, which --frontier finds; add --frontier")
    try:
        result = bench_micro(args.concept, out, methods=args.methods, steps=args.steps, limit=args.limit)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    print(f"\nmicro world, erasing {args.concept!r} ({len(result['rows']) - 1} methods):\n")
    print(bench_table(result))
    print(f"\n→ {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}; evaluation report in {out / 'eval'}")


def _bench_micro_class(args) -> None:
    from erasure.bench_classes import bench_micro_class, class_table

    out = Path(args.out or "bench-micro-class")
    result = bench_micro_class(out, methods=args.methods, classes=args.classes, steps=args.steps,
                               images_per_class=args.images_per_class, forget_images=args.forget_images,
                               retain_per_class=args.retain_per_class, ablation=not args.no_ablation)
    print(f"\nclass world: {', '.join(result['classes'])} forgotten in turn (mean ± std over classes):\n")
    print(class_table(result))
    print(f"\n→ {out / 'micro-class.md'}, {out / 'micro-class.json'}, {out / 'micro-class.png'}")


def _bench_micro_uncond(args) -> None:
    from erasure.bench_classes import DF_SHARES, bench_micro_uncond, uncond_table

    out = Path(args.out or f"bench-micro-uncond-{args.forget}")
    result = bench_micro_uncond(out, forget=args.forget, methods=args.methods, steps=args.steps, images=args.images,
                                forget_images=args.forget_images, retain_per_class=args.retain_per_class,
                                shares=() if args.no_shares else tuple(args.shares or DF_SHARES))
    print(f"\nunconditional world, forgetting {args.forget!r}: UR before (base) and after\n")
    print(uncond_table(result))
    print(f"\n→ {out / 'micro-uncond.md'}, {out / 'micro-uncond.json'}")


def _world_build(args) -> None:
    from erasure.world.model import WorldRecipe, build_world

    try:
        recipe = WorldRecipe.for_kind(args.kind, args.set, {"seed": args.seed})
    except ValueError as e:
        raise RecipeError(str(e)) from None
    record = build_world(args.out, recipe, device=args.device)
    print(f"\nworld written to {args.out} ({record['timings_s']})")
    if recipe.conditioning != "text":
        q = record["quality"]
        sampler = f"{record['sampler']['scheduler']}, {recipe.sample_steps} steps, guidance {recipe.guidance_scale:g}"
        verdict = "ok" if q["passed"] else "BELOW the bar"
        if recipe.conditioning == "class":
            print(f"oracle read-back of the prompted shape, {recipe.quality_per_class} samples per class ({sampler}):")
            for name, value in q["read_back"].items():
                print(f"  {name:<9} {value:6.1%}")
            print(f"  mean      {q['mean_read_back']:6.1%}  (bar ≥ {q['bar']:.0%}: {verdict})")
        else:
            print(f"share of {q['samples']} samples the oracle reads as each shape ({sampler}):")
            for name, value in q["frequency"].items():
                print(f"  {name:<9} {value:6.1%}")
            print(f"  largest gap from uniform {q['largest_gap_from_uniform']:.1%} (bar ≤ {q['bar']:.0%}: {verdict})")
        return
    bar = record["quality_bar"]
    print(f"oracle read-back on {len(record['held_out_captions'])} held-out captions × {recipe.quality_per_combo} "
          f"samples ({record['sampler']['scheduler']}, {recipe.sample_steps} steps, guidance {recipe.guidance_scale}):")
    aliases = record["quality_held_out_aliases"]
    print(f"  {'':<11} {'named':>6}  {'alias':>6}")
    for key, value in record["quality_held_out"].items():
        verdict = "ok" if min(value, aliases[key]) >= bar else f"BELOW the {bar:.0%} bar"
        print(f"  {key:<11} {value:6.1%}  {aliases[key]:6.1%}  {verdict}")


def _main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # all of train's flags come from the recipe dataclass
        from erasure.trainer import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.run(args)
    close_process_group()


def build_parser() -> Parser:
    """Every subcommand but train's flags (erasure.config.build_parser), in the order of the work:
    prompts → data → train → eval → attack → report → push, then the tools."""
    parser = Parser(prog="erasure", description="Concept erasure for diffusers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("prompts", help="concept specs → paired forget/retain prompt sets")
    prompt_commands = prompts.add_subparsers(dest="prompts_command", required=True)
    build = prompt_commands.add_parser("build", help="write DIR/train.jsonl, DIR/test.jsonl and DIR/stats.json")
    build.add_argument("spec", help="a concept spec, e.g. prompts/nudity.yaml")
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--train", type=int, help="train pairs (default: the spec's sizes.train, 800)")
    build.add_argument("--test", type=int, help="test pairs (default: the spec's sizes.test, 100)")
    build.add_argument("--uniform", action="store_true",
                       help="the single-template sets of the GradDiff / RG / SalUn baselines")
    build.add_argument("--llm", help="expand the spec with an LLM: 'openai' (any OpenAI-compatible "
                                     "endpoint) or 'local:PATH' (a transformers causal LM)")
    build.add_argument("--base-url", help="the endpoint, e.g. http://localhost:8000/v1")
    build.add_argument("--llm-model", help="the LLM's name at the endpoint (--llm openai)")
    build.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the API key (never logged or written)")
    build.add_argument("--timeout", type=float, default=60.0,
                       help="seconds for each attempt of an LLM request: connecting, sending and the whole answer")
    build.add_argument("--llm-retries", type=int, default=2,
                       help="retries of a failed LLM request (HTTP 408, 409, 429, 5xx, timeout, lost connection), "
                            "with exponential backoff that honours Retry-After up to 2 minutes (--llm openai)")
    build.add_argument("--no-llm-json", action="store_true",
                       help="never ask the endpoint for a JSON object (response_format json_object); without it, "
                            "an endpoint that refuses one (a 400 or 422 naming response_format) is asked in plain text "
                            "(--llm openai)")
    build.add_argument("--per-dimension", type=int, default=20, help="subconcepts to ask for per dimension")
    build.add_argument("--paraphrases", type=int, default=5, help="paraphrases of the concept to ask for")
    build.add_argument("--max-retries", type=int, default=3,
                       help="answers per step that may yield nothing usable (not a JSON array, every item "
                            "rejected) before giving up")
    build.set_defaults(run=_prompts_build)

    data = commands.add_parser("data", help="render paired images for a prompt set")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    generate = data_commands.add_parser("generate", help="render DIR/forget and DIR/retain image folders")
    generate.add_argument("--prompts", required=True, help="a train.jsonl or test.jsonl from `erasure prompts build` (forget_prompt / "
                          "retain_prompt per line; class names for a class-conditional model such as DiT)")
    generate.add_argument("--model", required=True, help="the base pipeline: hub id, folder, tiny:sd1 / tiny:sdxl / tiny:sd3 / tiny:flux / tiny:dit / tiny:class-unet / tiny:uncond, world:micro / world:class / world:uncond")
    generate.add_argument("--out", required=True)
    generate.add_argument("--steps", type=int,
                          help="sampler steps (default: the model's own sampler: a micro world's 20, SD 1.x's, SDXL's "
                          "and DiT's 50, SD3's and FLUX's 28, DDPM's 1000)")
    generate.add_argument("--guidance", type=float,
                          help="guidance scale (default: the model's own: a micro world's 3, SD 1.x's 7.5, SDXL's 5, "
                          "SD3's 7, FLUX's distilled 3.5, DiT's 4; DDPM has none: 1)")
    generate.add_argument("--size", type=int, help="image size; default: the model's native size")
    generate.add_argument("--batch-size", type=int, default=4)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--images-per-prompt", type=int, default=1)
    generate.add_argument("--limit", type=int, help="only the first N pairs")
    generate.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                          help="weights' precision; auto: float16 on a GPU, float32 on a CPU")
    generate.set_defaults(run=_data_generate)

    commands.add_parser("train", help="erase a concept: erasure train --recipe R.yaml [--key value …] "
                                      "(erasure train --help lists every recipe key)")

    evaluation = commands.add_parser("eval", help="generate, score and report: erasure eval --suite S --model A --model B")
    evaluation.add_argument("--suite", required=True, help="an eval/*.yaml suite")
    evaluation.add_argument("--model", action="append", required=True,
                            help="a pipeline folder, hub id or tiny:sd1 (repeat; the first is the reference)")
    evaluation.add_argument("--out", required=True)
    evaluation.add_argument("--dataset", help="I2P from a local CSV / parquet (or another hub id)")
    evaluation.add_argument("--prompt-set", help="the prompt set (train/test.jsonl) of a prompt_set suite")
    evaluation.add_argument("--limit", type=int, help="only the first N prompts")
    evaluation.add_argument("--steps", type=int)
    evaluation.add_argument("--images-per-prompt", type=int)
    evaluation.add_argument("--batch-size", type=int)
    evaluation.add_argument("--size", type=int)
    evaluation.add_argument("--clip-model", help="open_clip model name (default ViT-B-32)")
    evaluation.add_argument("--clip-pretrained", help="open_clip tag or a local checkpoint file; 'random' for a "
                            "randomly initialised CLIP (smoke tests: its scores mean nothing)")
    evaluation.add_argument("--inception-weights", help="the FID Inception weights file")
    evaluation.add_argument("--fid-reference", help="folder of reference images for FID")
    evaluation.set_defaults(run=_eval)

    attack = commands.add_parser("attack", help="does the concept come back? erasure attack --suite "
                                 "eval/attack-S.yaml --model BASE --model ERASED")
    attack.add_argument("--suite", required=True, help="an eval/attack-*.yaml suite")
    attack.add_argument("--model", action="append", required=True,
                        help="a pipeline folder, hub id, tiny:… or world:… (repeat; put the base first)")
    attack.add_argument("--out", required=True)
    attack.add_argument("--dataset", help="I2P from a local CSV / parquet (or another hub id)")
    attack.add_argument("--limit", type=int, help="only the first N attacked prompts")
    attack.add_argument("--steps", type=int)
    attack.add_argument("--batch-size", type=int)
    attack.add_argument("--size", type=int)
    attack.add_argument("--strength", type=float, help="the concept vector's strength η")
    attack.set_defaults(run=_attack)

    report = commands.add_parser("report", help="tabulate several evaluation runs side by side")
    report.add_argument("dirs", nargs="+")
    report.add_argument("--out", help="also write the table to this file")
    report.set_defaults(run=_report)

    push = commands.add_parser("push", help="publish an export on the Hugging Face Hub, its card with an evaluation")
    push.add_argument("dir", help="the output_dir of `erasure train`")
    push.add_argument("--hub-model-id", required=True, help="OWNER/NAME; created if missing")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--report", help="an `erasure eval` output folder: its protocol and tables go into the card")
    push.set_defaults(run=_push)

    tiny = commands.add_parser("tiny", help="write a tiny random pipeline for tests and demos")
    tiny.add_argument("family", choices=["sd1", "sd1-v", "sdxl", "sd3", "flux", "dit", "class-unet", "uncond"])  # erasure.tiny.TINY_BUILDERS (imports torch)
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny)
    world = commands.add_parser("world", help="the micro world: a CPU-trained SD-format model and its oracle")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    world_build = world_commands.add_parser(
        "build", help="train oracle, VAE and world model (≈40 min on two cores) into DIR, then check quality (named and by alias)")
    world_build.add_argument("--out", required=True, help="pipeline folder to write (replaced atomically)")
    world_build.add_argument("--kind", choices=["text", "class", "none"], default="text",
                             help="text: the captioned SD 1.x world (world:micro); class: a DiT whose class is the "
                                  "shape (world:class); none: an unconditional pixel DDPM (world:uncond)")
    world_build.add_argument("--seed", type=int, default=0)
    world_build.add_argument("--device", default="cpu")
    world_build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="override a world recipe field (erasure.world.model.WorldRecipe), e.g. --set steps=200")
    world_build.set_defaults(run=_world_build)
    bench = commands.add_parser("bench", help="benchmarks: erasure bench micro --concept striped")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    micro = bench_commands.add_parser(
        "micro", help="every method on the same micro-world data, seeds and budget: table and plot (RGD Table 1)")
    micro.add_argument("--concept", required=True, choices=WORLD_CONCEPTS)
    micro.add_argument("--out", help="default: bench-micro-<concept>")
    micro.add_argument("--methods", nargs="+", help="default: every method with a recipe in recipes/world/<concept>/")
    micro.add_argument("--steps", type=int, help="override every recipe's max_steps (reduced budgets)")
    micro.add_argument("--limit", type=int, help="evaluate only the first N captions of the suite "
                       "(with --frontier --attack: attack only the first N captions)")
    micro.add_argument("--frontier", action="store_true",
                       help="train each method for a long budget and read it every --every steps: UA against "
                            "neighbour accuracy and RA as curves over --seeds, retention at erasure")
    micro.add_argument("--every", type=int, help="frontier: steps between checks (default 10)")
    micro.add_argument("--images", type=int, help="frontier: captions per check, of the 960 named and by alias (default 192)")
    micro.add_argument("--seeds", type=int, nargs="+", help="frontier: seeds (default 0 1 2)")
    micro.add_argument("--attack", nargs="?", const="shipped", metavar="SUITE",
                       help="frontier: attack every method at its erasure point (UA ≥ 0.95) with an attack suite "
                            "(default: eval/attack-micro-<concept>.yaml); ASR table and plot")
    micro.set_defaults(run=_bench_micro)
    micro_class = bench_commands.add_parser(
        "micro-class", help="class world: each shape forgotten in turn by every method, UA / RA / Fréchet over "
                            "classes, and RGD's retain-diversity ablation (RGD Tables 1 and 3)")
    micro_class.add_argument("--out", help="default: bench-micro-class")
    micro_class.add_argument("--methods", nargs="+", help="default: finetune graddiff rgd salun esd-x "
                                                          "(recipes/world-class/<method>.yaml)")
    micro_class.add_argument("--classes", nargs="+", help="default: every shape")
    micro_class.add_argument("--steps", type=int, help="override every recipe's max_steps (reduced budgets)")
    micro_class.add_argument("--images-per-class", type=int, help="samples per class read by the oracle (default 64)")
    micro_class.add_argument("--forget-images", type=int, help="renders in D_f (default 200)")
    micro_class.add_argument("--retain-per-class", type=int, help="renders of each retained class in D_r (default 50, RGD §3)")
    micro_class.add_argument("--no-ablation", action="store_true", help="skip RGD with D_r from the 2 nearest classes")
    micro_class.set_defaults(run=_bench_micro_class)
    micro_uncond = bench_commands.add_parser(
        "micro-uncond", help="unconditional world: UR before and after MSGM (both losses, both signs) and the ascent "
                             "methods, and MSGM's ablation over the share of D_f used")
    micro_uncond.add_argument("--forget", default="triangle", help="the shape to stop generating (default triangle)")
    micro_uncond.add_argument("--out", help="default: bench-micro-uncond-<forget>")
    micro_uncond.add_argument("--methods", nargs="+", help="default: finetune graddiff rgd msgm-orthogonal msgm-obtuse "
                                                           "msgm-obtuse-paper-sign (recipes/world-uncond/)")
    micro_uncond.add_argument("--steps", type=int, help="override every recipe's max_steps (reduced budgets)")
    micro_uncond.add_argument("--images", type=int, help="samples read by the oracle per model (default 500)")
    micro_uncond.add_argument("--forget-images", type=int, help="renders in D_f (default 200)")
    micro_uncond.add_argument("--retain-per-class", type=int, help="renders of each retained class in D_r (default 50)")
    micro_uncond.add_argument("--shares", type=float, nargs="+", help="shares of D_f for the ablation (default 1 .8 .6 .4 .2)")
    micro_uncond.add_argument("--no-shares", action="store_true", help="skip the D_f share ablation")
    micro_uncond.set_defaults(run=_bench_micro_uncond)
    demo = commands.add_parser("demo", help="erase 'striped' from the shipped micro world with recipes/world/erase.yaml, evaluate, export, reload (≈4 min on 2 cores)")
    demo.add_argument("--out", default="erasure-demo", help="where the erased pipeline goes")
    demo.add_argument("--steps", type=int, help="training steps (default: the recipe's max_steps)")
    demo.add_argument("--limit", type=int, help="evaluate only the first N of the 960 captions (480 named, then 480 by alias)")
    demo.set_defaults(run=_demo)
    return parser


def close_process_group() -> None:
    """Close the process group of a command started as several processes (data generate, eval), once
    every process is done. Left to interpreter exit, it can abort a process after its work is done
    ("terminate called without an active exception": 3 of 48 two-process torchrun runs here, none
    of 48 when closed), and torchrun then fails the whole command."""
    if "torch.distributed" not in sys.modules:  # nothing started processes (report, prompts, …)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
