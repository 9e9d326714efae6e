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


def test_docs_cli_reference_is_the_live_help():
    """docs/cli-reference.md is generated from every command's --help; a changed option or help text must be
    regenerated with the one command the failure names."""
    import difflib

    from repae.cli.reference import DEFAULT_OUT, REGENERATE, render

    assert DEFAULT_OUT == ROOT / "docs" / "cli-reference.md"
    expected = render()
    current = DEFAULT_OUT.read_text(encoding="utf-8") if DEFAULT_OUT.is_file() else ""
    if current != expected:
        diff = list(difflib.unified_diff(current.splitlines(), expected.splitlines(), "docs/cli-reference.md",
                                         "live --help", lineterm="", n=1))
        shown = "\n".join(diff[:60]) + (f"\n... ({len(diff) - 60} more diff lines)" if len(diff) > 60 else "")
        raise AssertionError(f"docs/cli-reference.md is not the live --help of the commands. Regenerate it at the "
                             f"repository root with\n\n    {REGENERATE}\n\nand commit it. Difference:\n{shown}")


# The shell commands of README.md and docs/ are run or validated by tests/test_docs_commands.py.


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_in_the_guides_reach_files_and_headings():
    """Relative links (and their #anchors) in README.md and docs/*.md point at files and headings that exist."""
    problems = []
    for doc in ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]:
        source = ROOT / doc
        text = re.sub(r"```.*?```", "", source.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (source.parent / path).resolve() if path else source
            if not file.exists():
                problems.append(f"{doc}: {target}: no file {path}")
            elif anchor and file.suffix == ".md":
                body = re.sub(r"```.*?```", "", file.read_text(encoding="utf-8"), flags=re.DOTALL)
                headings = {_anchor(h) for h in re.findall(r"^#+ (.*)$", body, re.MULTILINE)}
                if anchor not in headings:
                    problems.append(f"{doc}: {target}: no heading #{anchor} in {path or doc}")
    assert not problems, "broken links:\n" + "\n".join(problems)
