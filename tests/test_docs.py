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


# Documents whose shell blocks are checked against the live CLI: every `repae ...` command (also under torchrun or
# `python -m repae`) must exist, every option it writes must be one of that command's, and a recipe under `recipes/`
# that exists must take the overrides written after it. In the guides a recipe must exist (elsewhere docs may show a
# user's own, `recipes/my_recipe.yaml`).
CHECKED_COMMANDS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
RECIPES_MUST_EXIST = {"README.md", "docs/getting-started.md", "docs/troubleshooting.md"}
_SEPARATORS = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&"}
_RECIPE_COMMANDS = {"repae run", "repae bench", "repae cache-latents", "repae recipe show", "repae recipe validate"}


def _shell_lines(text: str):
    """The command lines of the ```bash blocks of a Markdown text (backslash continuations joined)."""
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.DOTALL):
        yield from re.sub(r"\\\n\s*", " ", block).splitlines()


def _repae_calls(line: str):
    """``repae`` invocations on one shell line: the words after the program name, up to a shell operator."""
    import shlex

    words = shlex.split(line, comments=True)
    segment: list[str] = []
    for word in [*words, ";"]:
        if word in _SEPARATORS:
            if "repae" in segment:
                yield segment[segment.index("repae") + 1:]
            segment = []
        else:
            segment.append(word)


def _check_call(args: list[str], tree: dict, registry, *, recipe_must_exist: bool = True) -> str | None:
    """Why ``repae ARGS`` is not a valid invocation of the live CLI (None when it is)."""
    path, rest = "repae", list(args)
    while rest and f"{path} {rest[0]}" in tree:
        path, rest = f"{path} {rest[0]}", rest[1:]
    command, _ = tree[path]
    if hasattr(command, "list_commands") and not any(w in ("-h", "--help", "--version", "-V") for w in rest):
        return f"`{path}` has no command {rest[0] if rest else '(none given)'}"
    options = {opt: p for p in command.params if p.param_type_name == "option" for opt in [*p.opts, *p.secondary_opts]}
    options.update({"-h": None, "--help": None})
    positional: list[str] = []
    skip = 0
    for word in rest:
        if skip:
            skip -= 1
        elif word.startswith("-") and not re.match(r"^-\d", word):
            name = word.split("=", 1)[0]
            if name not in options:
                return f"`{path}` has no option {name}"
            param = options[name]
            if param is not None and not param.is_flag and "=" not in word:
                skip = max(param.nargs, 1)
        else:
            positional.append(word)
    if path in _RECIPE_COMMANDS and positional and positional[0].startswith("recipes/"):
        recipe = ROOT / positional[0]
        if not recipe.is_file():
            return f"recipe {positional[0]} does not exist" if recipe_must_exist else None
        try:
            read_recipe(recipe, [w for w in positional[1:] if "=" in w], registry)
        except Exception as exc:  # noqa: BLE001 - report any refusal with the line
            return f"the recipe refuses the overrides: {exc}"
    return None


def test_commands_in_the_guides_are_live_commands_and_options():
    from repae.cli.reference import commands

    tree, registry = commands(), load_plugins().registry
    problems, checked = [], 0
    for doc in CHECKED_COMMANDS:
        for line in _shell_lines((ROOT / doc).read_text(encoding="utf-8")):
            for args in _repae_calls(line):
                checked += 1
                why = _check_call(args, tree, registry, recipe_must_exist=doc in RECIPES_MUST_EXIST)
                if why:
                    problems.append(f"{doc}: {line.strip()}\n    {why}")
    assert checked >= 50, f"only {checked} repae commands found in {CHECKED_COMMANDS}"
    assert not problems, "commands in the docs that the CLI does not take:\n" + "\n".join(problems)


def test_the_command_checker_catches_mistakes():
    from repae.cli.reference import commands

    tree, registry = commands(), load_plugins().registry
    good = "torchrun --nproc-per-node 8 -m repae run recipes/quickstart.yaml trainer.steps=10 --out runs/x"
    assert [_check_call(a, tree, registry) for a in _repae_calls(good)] == [None]
    for bad, why in [
        ("repae runn recipes/quickstart.yaml", "no command runn"),
        ("repae run recipes/quickstart.yaml --outt runs/x", "no option --outt"),
        ("repae recipe show recipes/nope.yaml", "does not exist"),
        ("repae run recipes/quickstart.yaml trainer.stepz=3", "refuses the overrides"),
        ("pip install -e . && repae sample runs/x --cfgg 2", "no option --cfgg"),
    ]:
        (args,) = list(_repae_calls(bad))
        assert why in (_check_call(args, tree, registry) or ""), bad


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
