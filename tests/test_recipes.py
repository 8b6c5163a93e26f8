"""Every shipped recipe reads, and validates once its data folders exist."""

import pytest

from conftest import RECIPES
from erasure.config import METHODS, TrainConfig, read_recipe

ALL = sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml"))


@pytest.mark.parametrize("recipe", ALL)
def test_recipe_is_valid(recipe):
    values = read_recipe(RECIPES / recipe)
    # real data is built by the user; stand in the tiny sets (recipes/world/erase.yaml and the class
    # and unconditional worlds' recipes take their data, like their concept, from flags: give them some)
    generic = recipe == "world/erase.yaml" or recipe.startswith(("world-class/", "world-uncond/"))
    for key in ("forget_data", "retain_data"):
        if values.get(key) or generic:
            values[key] = "tiny:" + key.split("_")[0]
    values.setdefault("concept", "striped")
    config = TrainConfig(**values)
    assert config.method in METHODS


def test_a_tiny_recipe_per_method_and_the_paper_recipes_ship():
    assert {f"tiny/{m}.yaml" for m in METHODS} <= set(ALL)
    assert {"sd14/nudity-rgd.yaml", "sd14/van-gogh-rgd.yaml", "sd3/nudity-rgd.yaml",
            "sdxl/nudity-rgd.yaml", "sdxl/nudity-rgd-lora.yaml", "flux/nudity-rgd.yaml"} <= set(ALL)
    assert {f"sd14/nudity-{m}.yaml" for m in METHODS} <= set(ALL)
    paper = TrainConfig(**{**read_recipe(RECIPES / "sd14/nudity-rgd.yaml"), "forget_data": "tiny:forget",
                           "retain_data": "tiny:retain"})
    assert (paper.learning_rate, paper.batch_size, paper.max_steps, paper.retain_weight,
            paper.forget_loss_cap, paper.scope) == (1e-5, 8, 100, 1.5, 1.1, "full")


@pytest.mark.parametrize("recipe", [r for r in ALL if "msgm" in r or "salun" in r])
def test_baseline_recipes_keep_their_own_retain_weight(recipe):
    """An include: of an RGD recipe must not hand RGD's λ = 1.5 to MSGM (0.99) or SalUn (α = 0.1)."""
    values = {**read_recipe(RECIPES / recipe), "forget_data": "tiny:forget", "retain_data": "tiny:retain"}
    config = TrainConfig(**values)
    assert config.retain_weight == (0.1 if config.method == "salun" else 0.99), recipe
