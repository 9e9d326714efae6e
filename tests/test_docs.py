"""Docs that cannot drift: blocks the code generates are compared with what it prints now."""

from __future__ import annotations

import re

from repae.compose import compose_recipe
from repae.plugins import load_plugins
from repae.recipe import read_recipe

from conftest import ROOT


def test_the_step_plan_in_docs_training_is_what_the_trainer_plans():
    text = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"```text\n(step plan .*?)\n```", text, re.DOTALL)
    assert block, "docs/training.md shows the headline recipe's step plan in a ```text block"
    resolved = read_recipe(ROOT / "recipes" / "repae_sdvae_dinov2.yaml", [], load_plugins().registry)
    plan = compose_recipe(resolved, check_step=False).plan
    assert plan is not None
    assert block.group(1) == plan.describe()
