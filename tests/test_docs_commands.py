"""Docs that cannot drift: every shell command in README.md, docs/**/*.md and examples/*/README.md is run, or
parsed and validated, or marked as skipped with its reason.

A shell command is a line of a ```bash / ```sh / ```shell / ```console block (backslash continuations joined; in a
console block only the ``$ `` lines), or a ``$ `` line of any other fenced block. Each is split into its commands
(``&&``, ``||``, ``;``, ``|``; redirections and leading ``VAR=value``, ``time``, ``srun`` dropped), and each command is:

- **run** (typer's ``CliRunner``, in a scratch folder, exit code 0): cheap ``repae`` commands that read only recipes
  and plugins: ``list``, ``show``, ``plugins``, ``--version``, ``recipe show``, ``recipe validate``, ``run --dry-run``
  and ``sweep --dry-run`` (components built on ``meta``);
- **validated**, the other ``repae`` commands (also under ``torchrun`` or ``python -m repae``): the command and its
  options parsed by the live CLI (click's ``make_context``: an unknown command or option, a missing argument or a bad
  choice fails); a component an option names exists (``--sampler``, ``--metrics`` and ``--set``, ``--dataset``;
  ``--format`` is one that a component of a recipe used in the docs declares, or ``safetensors``); a recipe argument
  exists and the recipe with the overrides given composes on ``meta`` (a sweep: its arguments parse and every
  point composes).
  ``torchrun`` options are parsed by torchrun's own parser; ``python SCRIPT.py`` needs the script and each
  ``--option`` it is given among the script's own; ``pip install`` needs the paths and the extras named (in their
  ``pyproject.toml``), and any other package named must be one of repae's dependencies; ``pytest -m EXPR`` needs the
  markers declared;
- **skipped**, only where the docs say so with a reason (downloads, data or files the reader has): an HTML comment
  on the line before the block, ``<!-- docs-test: skip (needs network: downloads the weights) -->``, skips the block;
  a trailing comment ``# docs-test: skip (REASON)`` (alone or after other words) skips one line. Any other command
  (a program this test does not know) fails until it is marked. docs/cli.md describes the marker.

Commands written inline in the prose and tables (``repae export --format F``, ``pip install 'repae[wandb]'``) are
checked more loosely, as usage text: the command and every option they name exist, the extras too. docs/sweeps.md's
table of sweep arguments is checked against the headline recipe.

A recipe that does not exist is accepted only as a placeholder for the reader's own (``my_recipe.yaml``,
``recipes/my_*.yaml``, ``RECIPE``): the command is then only parsed. docs/plugins.md's commands run with the page's
own plugin (acme-repae, assembled from the page as tests/test_plugin_contract.py does) in the page's folder, the
example plugin's README with that plugin installed.

The counts (found, run, validated, skipped) are printed; ``python tests/test_docs_commands.py`` lists every command
with what was done with it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLE_PLUGIN, ROOT

DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")),
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*/README.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
BLOCK_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
LINE_MARK = re.compile(r"#.*?\bdocs-test:\s*(?P<body>.*)$")
REASON = re.compile(r"^skip\s*\((?P<reason>[^()]*\S[^()]*)\)$")
SEPARATORS = {"&&", "||", "|", ";", "&"}
REDIRECTIONS = {">", ">>", "<", "2>", "2>>", "&>"}
PREFIXES = {"time", "srun", "nohup", "exec", "env"}
PLACEHOLDER_RECIPE = re.compile(r"(^|/)(my_[\w-]*\.ya?ml|[A-Z_]+)$")
RECIPE_COMMANDS = {"repae run", "repae bench", "repae cache-latents", "repae recipe show", "repae recipe validate",
                   "repae sweep"}
RUN_ALWAYS = {"repae", "repae list", "repae show", "repae plugins", "repae recipe show", "repae recipe validate"}
RUN_WHEN_DRY = {"repae run", "repae sweep"}
COMPONENT_OPTIONS = {("repae sample", "sampler"): "sampler", ("repae prepare-data", "dataset"): "dataset"}
PLUGIN_CONTEXT = {"docs/plugins.md": "acme", str(EXAMPLE_PLUGIN.relative_to(ROOT) / "README.md"): "example"}
"""Documents whose commands use a plugin beyond repae's own: the page's acme-repae, or the example plugin."""


@dataclass
class Command:
    doc: str
    line: int
    text: str  # the shell line, continuations joined
    words: list[str] = field(default_factory=list)  # one command of it (shell-split), operators removed
    skip: str | None = None  # the marker's reason
    outcome: str = ""  # "ran", "validated", "skipped", or "" (failed)
    note: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


# ------------------------------------------------------------------------------------------------------ extraction


def _mark(body: str, where: str, problems: list[str]) -> str | None:
    """The reason of a ``docs-test:`` marker; a marker that is not ``skip (REASON)`` is a problem."""
    found = REASON.match(body.strip())
    if not found:
        problems.append(f"{where}: docs-test marker {body.strip()!r}: write `docs-test: skip (REASON)`, the reason "
                        "saying why the command cannot run here")
        return None
    return found["reason"].strip()


def _split(text: str) -> list[list[str]]:
    """The commands of one shell line: words up to an operator, redirections removed."""
    words = shlex.split(text, comments=True)
    out, current, drop = [], [], False
    for word in [*words, ";"]:
        if drop:
            drop = False
        elif word in SEPARATORS:
            if current:
                out.append(current)
            current = []
        elif word in REDIRECTIONS:
            drop = True
        elif re.fullmatch(r"\d?>&\d|\d?>>?\S+", word):
            continue
        else:
            current.append(word)
    return out


def shell_commands(doc: str, text: str, problems: list[str]) -> list[Command]:
    """Every shell command of a Markdown text (see the module docstring), with its skip reason if marked."""
    lines = text.splitlines()
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            mark = BLOCK_MARK.match(lines[i])
            if mark and (i + 1 >= len(lines) or not FENCE.match(lines[i + 1])):
                problems.append(f"{doc}:{i + 1}: a docs-test marker must be on the line just before a code block")
            i += 1
            continue
        ticks, lang = fence.group(1), fence.group(2).lower()
        mark = BLOCK_MARK.match(lines[i - 1]) if i else None
        block_skip = _mark(mark["body"], f"{doc}:{i}", problems) if mark else None
        body: list[tuple[int, str]] = []
        i += 1
        while i < len(lines) and not lines[i].lstrip().startswith(ticks[0] * len(ticks)):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        shell = lang in SHELL_LANGS
        prompts = lang == "console" or any(line.lstrip().startswith("$ ") for _, line in body)
        if not shell and not prompts:
            continue
        logical: list[tuple[int, str]] = []
        for number, line in body:
            if logical and logical[-1][1].endswith("\\"):
                logical[-1] = (logical[-1][0], logical[-1][1][:-1] + " " + line.strip())
            else:
                logical.append((number, line))
        for number, line in logical:
            stripped = line.strip()
            if prompts:
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:]
            if not stripped or stripped.startswith("#"):
                continue
            skip = block_skip
            tail = LINE_MARK.search(stripped)
            if tail:
                skip = _mark(tail["body"], f"{doc}:{number}", problems) or skip
            try:
                parts = _split(stripped)
            except ValueError as exc:
                problems.append(f"{doc}:{number}: `{stripped}`: not a shell line ({exc})")
                continue
            commands += [Command(doc, number, stripped, words, skip) for words in parts]
    return commands


# ------------------------------------------------------------------------------------------------------ checking


class Context:
    """Where a document's commands run: a scratch folder holding ``recipes/`` (the page's own recipe for
    docs/plugins.md) and the plugins selected."""

    def __init__(self, cwd: Path, plugins: str) -> None:
        self.cwd, self.plugins = cwd, plugins
        self._registry: Any = None
        self.compositions: dict[tuple, Any] = {}
        self.done: dict[tuple, str | None] = {}  # commands already run: key -> why it failed (None: passed)
        self.formats: list[tuple[Command, str]] = []  # export --format values, checked at the end

    @contextlib.contextmanager
    def active(self, monkeypatch: pytest.MonkeyPatch):
        with monkeypatch.context() as mp:
            mp.setenv("REPAE_PLUGINS", self.plugins)
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.chdir(self.cwd)
            yield self

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from repae.plugins import load_plugins

            self._registry = load_plugins().registry
        return self._registry

    def compose(self, recipe: str, overrides: list[str]) -> str | None:
        """Why ``recipe`` with ``overrides`` does not compose on ``meta`` (None when it does)."""
        key = (str(Path(recipe).resolve()), tuple(overrides))
        if key not in self.compositions:
            from repae.compose import compose_recipe
            from repae.recipe import read_recipe

            try:
                self.compositions[key] = compose_recipe(read_recipe(recipe, overrides, self.registry),
                                                        check_step=False)
            except Exception as exc:  # noqa: BLE001 - any refusal is the finding
                self.compositions[key] = f"{type(exc).__name__}: {exc}"
        found = self.compositions[key]
        return found if isinstance(found, str) else None

    def export_formats(self) -> set[str]:
        """``safetensors`` and every format a component of a recipe composed here declares."""
        from repae.export import GENERIC_FORMAT

        formats = {GENERIC_FORMAT}
        for composition in self.compositions.values():
            if not isinstance(composition, str):
                for built in composition.built:
                    formats.update(getattr(built.component, "export_formats", None) or ())
        return formats


def _invoke(args: list[str]) -> str | None:
    """Run ``repae ARGS`` in this process; why it failed (None when it exited with 0 and printed no traceback)."""
    from typer.testing import CliRunner

    from repae.cli import app

    result = CliRunner().invoke(app, args)
    output = result.output
    if result.exit_code != 0 or "Traceback" in output:
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            output += f"\n{type(result.exception).__name__}: {result.exception}"
        tail = "\n".join(output.strip().splitlines()[-12:])
        return f"`repae {shlex.join(args)}` exited with {result.exit_code}:\n{tail}"
    return None


def _optional(words: list[str]) -> list[str]:
    """Usage brackets dropped: ``[--json]``, ``[--workers 0,1,2]`` are written as given."""
    out, inside = [], False
    for word in words:
        if word.startswith("[-"):
            word, inside = word[1:], True
        if inside and word.endswith("]"):
            word, inside = word[:-1], False
        out.append(word)
    return out


@functools.cache
def _root_command() -> Any:
    """The live CLI as click's command tree (built once: building it is most of the cost of parsing)."""
    import typer

    from repae.cli import app

    return typer.main.get_command(app)


def _parse(args: list[str]) -> tuple[str, Any, str | None]:
    """``(command path, click context or None, why parsing failed)`` for ``repae ARGS``: the command resolved through
    the live CLI's groups and its arguments parsed (callbacks included, so choices are checked)."""
    command: Any = _root_command()
    path, rest, parent = "repae", list(args), None
    while hasattr(command, "list_commands") and rest and not rest[0].startswith("-"):
        ctx = command.context_class(command, info_name=path.rsplit(" ", 1)[-1], parent=parent)
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            known = ", ".join(command.list_commands(ctx))
            return path, None, f"`{path}` has no command {rest[0]!r} (commands: {known})"
        command, parent, path, rest = sub, ctx, f"{path} {rest[0]}", rest[1:]
    if hasattr(command, "list_commands") and not rest:
        return path, None, f"`{path}` needs a command"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ctx = command.make_context(path.rsplit(" ", 1)[-1], rest, parent=parent, resilient_parsing=False)
    except Exception as exc:  # noqa: BLE001 - click's and typer's (possibly vendored) exception classes
        if type(exc).__name__ == "Exit" and getattr(exc, "exit_code", 0) == 0:  # --help, --version
            return path, None, None
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        return path, None, f"`{path}` does not take these arguments: {message}"
    return path, ctx, None


def check_repae(cmd: Command, args: list[str], ctx: Context, *, under: str = "") -> str | None:
    """Run or validate ``repae ARGS`` (see the module docstring); why it fails (None when it passes). Sets
    ``cmd.outcome``."""
    args = _optional(args)
    path, parsed, why = _parse(args)
    if why:
        return why
    cmd.outcome = "validated"
    if parsed is None:  # --help / --version
        if not under:
            cmd.outcome = "ran"
            return _invoke(args)
        return None
    params = parsed.params
    for (command, name), kind in COMPONENT_OPTIONS.items():
        if path == command and params.get(name):
            try:
                ctx.registry.get(kind, params[name])
            except Exception as exc:  # noqa: BLE001
                return f"{name} {params[name]!r}: {exc}"
    if path == "repae eval" and (params.get("metrics") or params.get("settings")):
        from repae.cli.eval import _choose_metrics

        try:
            _choose_metrics(params.get("metrics"), list(params.get("settings") or []))
        except Exception as exc:  # noqa: BLE001
            return f"--metrics/--set: {exc}"
    if path == "repae export":
        ctx.formats.append((cmd, params["fmt"]))
    dry = bool(params.get("dry_run"))
    if path in RECIPE_COMMANDS:
        recipe = str(params["recipe"])
        if not (ctx.cwd / recipe).is_file():
            if PLACEHOLDER_RECIPE.search(recipe):
                cmd.note = "placeholder recipe: parsed only"
                return None
            return f"recipe {recipe} does not exist"
    if not under and (path in RUN_ALWAYS or (path in RUN_WHEN_DRY and dry)):
        key = tuple(args)
        if key not in ctx.done:
            ctx.done[key] = _invoke(args)
        cmd.outcome = "ran"
        return ctx.done[key]
    if path == "repae sweep":
        return _check_sweep(cmd, str(params["recipe"]), [str(a) for a in params.get("args") or []], ctx)
    if path in RECIPE_COMMANDS:
        overrides = [str(o) for o in params.get("overrides") or []]
        why = ctx.compose(str(params["recipe"]), overrides)
        return f"the recipe with {overrides or 'no overrides'} does not compose: {why}" if why else None
    return None


def _check_sweep(cmd: Command, recipe: str, args: list[str], ctx: Context) -> str | None:
    """A sweep's arguments parse (repae.sweep.parse_sweep_args) and every point's recipe composes on ``meta``."""
    from repae.sweep import parse_sweep_args

    try:
        parsed = parse_sweep_args(args)
    except Exception as exc:  # noqa: BLE001
        return f"the sweep arguments are refused: {exc}"
    axes = {a.position: a for a in parsed.axes}
    points = list(itertools.product(*(range(len(a.texts)) for a in parsed.axes)))
    for choice in points:
        pick = dict(zip(axes, choice))
        overrides = [f"{axes[p].key}={axes[p].texts[pick[p]]}" if p in axes else arg
                     for p, arg in enumerate(parsed.args)]
        why = ctx.compose(recipe, overrides)
        if why:
            return f"the sweep's point {overrides} does not compose: {why}"
    cmd.note = f"{len(points)} point(s) composed"
    return None


def _pyproject(folder: Path) -> dict:
    import tomllib

    return tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0]).lower()


def check_pip(words: list[str]) -> str | None:
    """``pip install ...``: local paths have a pyproject.toml with the extras named; repae's extras exist; any
    other package is one of repae's declared requirements."""
    if not words or words[0] != "install":
        return f"pip {' '.join(words[:1])}: only `pip install` is checked; mark the line"
    repae = _pyproject(ROOT)["project"]
    declared = {_name(r) for r in repae["dependencies"]}
    declared |= {_name(r) for reqs in repae.get("optional-dependencies", {}).values() for r in reqs}
    with_value = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r", "--requirement"}
    skip = False
    for word in words[1:]:
        if skip:
            skip = False
            continue
        if word in with_value:
            skip = True
            continue
        if word.startswith("-"):
            continue
        target, extras = re.fullmatch(r"([^\[]+)(?:\[([^\]]*)\])?", word).groups()
        if target.startswith((".", "/")) or "/" in target:
            folder = ROOT / target
            if not (folder / "pyproject.toml").is_file():
                return f"pip install {word}: no pyproject.toml in {target}"
            project = _pyproject(folder)["project"]
        elif _name(target) == "repae":
            project = repae
        elif _name(target) in declared:
            continue
        else:
            return f"pip install {word}: {target} is neither repae nor one of its requirements"
        for extra in (e.strip() for e in (extras or "").split(",") if e.strip()):
            if extra not in project.get("optional-dependencies", {}):
                return (f"pip install {word}: {project['name']} has no extra {extra!r} (extras: "
                        f"{', '.join(project.get('optional-dependencies', {})) or 'none'})")
    return None


def check_pytest(words: list[str]) -> str | None:
    """``pytest``: pytest is in the test extra; ``-m EXPR`` names declared markers only."""
    config = _pyproject(ROOT)
    if "pytest" not in {_name(r) for r in config["project"]["optional-dependencies"].get("test", [])}:
        return "pytest is not in the test extra of pyproject.toml"
    markers = {m.split(":")[0].strip() for m in config["tool"]["pytest"]["ini_options"].get("markers", [])}
    for flag, expr in itertools.pairwise(words):
        if flag == "-m":
            unknown = set(re.findall(r"[\w-]+", expr)) - {"and", "or", "not"} - markers
            if unknown:
                return f"pytest -m {expr!r}: no marker {', '.join(sorted(unknown))} (declared: {', '.join(markers)})"
    return None


def check_script(script: str, args: list[str]) -> str | None:
    """``python SCRIPT ARGS``: the script exists and each ``--option`` is one it declares."""
    path = ROOT / script
    if not path.is_file():
        return f"no script {script}"
    source = path.read_text(encoding="utf-8")
    for word in _optional(args):
        option = word.split("=", 1)[0]
        if option.startswith("--") and option != "--help" and not re.search(rf"[\"']{re.escape(option)}[\"']", source):
            return f"{script} has no option {option}"
    return None


def check_torchrun(cmd: Command, words: list[str], ctx: Context, program: str) -> str | None:
    """torchrun's options by torchrun's own parser, then the module (repae) or script it starts."""
    from torch.distributed.run import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser = get_args_parser()
            parser.allow_abbrev = False  # the docs write torchrun's options in full
            ns = parser.parse_args(words)
    except SystemExit:
        return f"{program} does not take these options: {err.getvalue().strip().splitlines()[-1]}"
    cmd.outcome = "validated"
    if ns.module:
        if ns.training_script != "repae":
            return f"{program} -m {ns.training_script}: only `-m repae` is checked; mark the line"
        return check_repae(cmd, ns.training_script_args, ctx, under=program)
    return check_script(ns.training_script, ns.training_script_args)


def check_command(cmd: Command, ctx: Context) -> str | None:
    """Run or validate one command; why it fails (None when it passes or is marked skipped)."""
    if cmd.skip is not None:
        cmd.outcome = "skipped"
        return None
    words = list(cmd.words)
    while words and (re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]) or words[0] in PREFIXES):
        words = words[1:]
    if not words:
        return "no command"
    program, rest = words[0], words[1:]
    module = None
    if program in ("python", "python3") and rest[:1] == ["-m"] and len(rest) > 1:
        module, rest = rest[1], rest[2:]
    if program == "repae" or module == "repae":
        return check_repae(cmd, rest, ctx)
    cmd.outcome = "validated"
    if program == "torchrun" or module == "torch.distributed.run":
        return check_torchrun(cmd, rest, ctx, program if module is None else f"python -m {module}")
    if program in ("pip", "pip3") or module == "pip":
        return check_pip(rest)
    if program == "pytest" or module == "pytest":
        return check_pytest(rest)
    if program in ("python", "python3") and module is None and rest and rest[0].endswith(".py"):
        return check_script(rest[0], rest[1:])
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return f"python -m {module}: no module {module}"
        cmd.note = "module found"
        return None
    cmd.outcome = ""
    return (f"`{program}` is not a command this test can run or validate: mark the block with `<!-- docs-test: skip "
            f"(REASON) -->` on the line before it, or the line with a trailing `# docs-test: skip (REASON)`")


def _acme_folder(root: Path, fake_dists: Any) -> Path:
    """docs/plugins.md's package (acme-repae) written under ``root`` and installed; its folder (with its recipe)."""
    from test_plugin_contract import doc_files, entry_point

    files = doc_files()
    folder = root / "acme-repae"
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    dist, version, name, target = entry_point(files["pyproject.toml"])
    fake_dists.add(dist, {name: target}, version=version, source_dir=folder)
    return folder


def check_docs(docs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_dists: Any,
               texts: dict[str, str] | None = None) -> tuple[list[Command], list[str]]:
    """Every command of ``docs`` (their texts from ``texts`` when given) run, validated or skipped: the commands
    and the problems found."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    if not (work / "recipes").exists():
        (work / "recipes").symlink_to(ROOT / "recipes")
    contexts: dict[str, Context] = {}

    def context(kind: str) -> Context:
        if kind not in contexts:
            if kind == "acme":
                contexts[kind] = Context(_acme_folder(tmp_path, fake_dists), "repae,acme-repae")
            elif kind == "example":
                fake_dists.add("repae-plugin-example", {"example": "repae_plugin_example"}, version="0.1.0",
                               source_dir=EXAMPLE_PLUGIN)
                contexts[kind] = Context(work, "repae,repae-plugin-example")
            else:
                contexts[kind] = Context(work, "repae")
        return contexts[kind]

    problems: list[str] = []
    commands: list[Command] = []
    for doc in docs:
        text = texts[doc] if texts is not None else (ROOT / doc).read_text(encoding="utf-8")
        found = shell_commands(doc, text, problems)
        commands += found
        ctx = context(PLUGIN_CONTEXT.get(doc, "builtin"))
        with ctx.active(monkeypatch):
            for cmd in found:
                why = check_command(cmd, ctx)
                if why:
                    cmd.outcome = ""
                    problems.append(f"{cmd.where}: `{shlex.join(cmd.words)}`\n    {why}")
    for ctx in contexts.values():
        if ctx.formats:
            with ctx.active(monkeypatch):
                formats = ctx.export_formats()
            for cmd, fmt in ctx.formats:
                if fmt not in formats:
                    cmd.outcome = ""
                    problems.append(f"{cmd.where}: `{shlex.join(cmd.words)}`\n    --format {fmt}: no component of "
                                    f"a recipe these docs use declares it (formats: {', '.join(sorted(formats))})")
    return commands, problems


def summary(commands: list[Command]) -> str:
    counts = {k: sum(c.outcome == k for c in commands) for k in ("ran", "validated", "skipped")}
    failed = sum(not c.outcome for c in commands)
    reasons: dict[str, list[str]] = {}
    for c in commands:
        if c.outcome == "skipped":
            reasons.setdefault(f"{c.skip} ({c.doc})", []).append(str(c.line))
    return (f"{len(commands)} shell commands in {len({c.doc for c in commands})} documents: {counts['ran']} run, "
            f"{counts['validated']} validated, {counts['skipped']} skipped, {failed} failed"
            + "".join(f"\n  skipped, {r}, lines {', '.join(dict.fromkeys(n))}" for r, n in reasons.items()))


# ------------------------------------------------------------------------------------------------------ tests


def test_every_shell_command_in_the_docs_is_run_validated_or_marked(tmp_path, monkeypatch, fake_dists, capsys):
    start, cpu = time.perf_counter(), time.process_time()
    commands, problems = check_docs(DOCS, tmp_path, monkeypatch, fake_dists)
    report = summary(commands) + f"\n({time.perf_counter() - start:.1f} s, {time.process_time() - cpu:.1f} s of CPU)"
    with capsys.disabled():
        print(f"\n{report}")
    assert len(commands) >= 80, f"only {len(commands)} shell commands found in {DOCS}"
    assert sum(c.outcome == "ran" for c in commands) >= 15, report
    assert not problems, f"{len(problems)} shell command(s) in the docs fail:\n" + "\n".join(problems) + f"\n{report}"


def test_the_sweep_arguments_in_docs_sweeps_are_valid():
    """docs/sweeps.md's table of sweep arguments: each parses as a sweep argument and each of its values is a valid
    override of the headline recipe (the table once swept `latent_norm={name: batch-norm}`, a normaliser that does
    not exist)."""
    from repae.plugins import load_plugins
    from repae.recipe import read_recipe
    from repae.sweep import parse_sweep_args

    text = (ROOT / "docs" / "sweeps.md").read_text(encoding="utf-8")
    table = re.search(r"^\| argument \| values \|\n\|[-|]+\|\n((?:\|.*\n)+)", text, re.MULTILINE)
    assert table, "docs/sweeps.md has a table `| argument | values |` of sweep arguments"
    arguments = re.findall(r"^\| `([^`]+)` \|", table.group(1), re.MULTILINE)
    assert len(arguments) >= 4
    registry = load_plugins().registry
    problems = []
    for argument in arguments:
        try:
            parsed = parse_sweep_args([argument])
            points = [[f"{a.key}={t}"] for a in parsed.axes for t in a.texts] or [list(parsed.args)]
            for overrides in points:
                read_recipe(ROOT / "recipes" / "repae_sdvae_dinov2.yaml", overrides, registry)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"`{argument}`: {exc}")
    assert not problems, "docs/sweeps.md's sweep arguments that repae refuses:\n" + "\n".join(problems)


def inline_commands(text: str) -> list[tuple[int, str]]:
    """``(line, span)`` of the inline code spans of a Markdown text (fenced blocks left out) that write a ``repae`` or
    ``pip install`` command."""
    out = []
    inside = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            out += [(number, span) for span in re.findall(r"`((?:repae|pip install) [^`]+)`", line)]
    return out


def check_inline(span: str) -> str | None:
    """An inline ``repae ...`` span names a live command and only options of it (usage syntax allowed: metavariables,
    ``[...]``, ``a|b``, ``--a/--b``, ``...``); an inline ``pip install`` names existing extras."""
    words = shlex.split(span.replace("\\|", " "), posix=True) if "'" in span else span.replace("\\|", " ").split()
    if words[:2] == ["pip", "install"]:
        return check_pip(words[1:])
    command: Any = _root_command()
    path, rest = "repae", words[1:]
    while hasattr(command, "list_commands") and rest and re.fullmatch(r"[a-z][\w-]*", rest[0]):
        sub = command.get_command(command.context_class(command, info_name=path), rest[0])
        if sub is None:
            return f"`{path}` has no command {rest[0]!r}"
        command, path, rest = sub, f"{path} {rest[0]}", rest[1:]
    options = {o for p in command.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
               if getattr(p, "param_type_name", "") == "option"} | {"-h", "--help"}
    for word in rest:
        for token in re.split(r"[|/]", word.strip("[]()…,.;:")):
            name = token.strip("[]()").split("=", 1)[0]
            if re.fullmatch(r"--?[a-zA-Z][\w-]*", name) and name not in options:
                return f"`{path}` has no option {name}"
    return None


def test_inline_commands_in_the_docs_name_live_commands_and_options():
    """The commands written inline in the prose and tables (`repae export --format F`, `repae sample
    --steps/--cfg/--guidance-interval`, `pip install 'repae[wandb]'`) name commands, options and extras that exist:
    a renamed option shows up here too."""
    problems, count = [], 0
    for doc in DOCS:
        for number, span in inline_commands((ROOT / doc).read_text(encoding="utf-8")):
            count += 1
            why = check_inline(span)
            if why:
                problems.append(f"{doc}:{number}: `{span}`\n    {why}")
    assert count >= 150, f"only {count} inline commands found"
    assert not problems, f"{len(problems)} inline command(s) in the docs name what does not exist:\n" + "\n".join(
        problems)


def test_the_inline_check_catches_mistakes():
    assert check_inline("repae sample RUN --steps/--cfg/--guidance-interval [--json]") is None
    assert check_inline("repae bench RECIPE [--weights\\|--random-weights] [--peak-tflops T]") is None
    assert check_inline("pip install 'repae[wandb]'") is None
    for span, why in [("repae sample RUN --steps/--cfgg", "no option --cfgg"), ("repae exprot RUN", "no command"),
                      ("repae recipe valid X", "no command 'valid'"), ("pip install 'repae[wandbb]'", "no extra"),
                      ("repae run RECIPE [--dryrun]", "no option --dryrun")]:
        assert why in (check_inline(span) or ""), span


# A reason is a text the report must contain, or a tuple of texts it must all contain (click words "No such option"
# differently by version: "No such option: --x" before 8.2, "No such option '--x'" after).
MISTAKES = {
    "the normaliser misspelt in a sweep": (
        "repae sweep recipes/quickstart.yaml 'latent_norm={name: batch-norm},{name: batchnorm}' --out runs/s",
        "unknown normalizer 'batch-norm'"),
    "a renamed option": ("repae sample runs/qs -n 64 --cfg-scale 1.8", ("No such option", "--cfg-scale")),
    "an option of another command": ("repae run recipes/quickstart.yaml --steps 3", ("No such option", "--steps")),
    "a misspelt command": ("repae runn recipes/quickstart.yaml", "has no command 'runn'"),
    "a misspelt sampler": ("repae sample runs/qs --sampler euler-maruyamma", "euler-maruyamma"),
    "a misspelt metric": ("repae eval s.npz --ref r.npz --metrics fid,iss", "unknown metric 'iss'"),
    "a --set of a metric not chosen": ("repae eval s.npz --ref r.npz --metrics fid --set is.splits=5", "not among"),
    "an export format no component declares": ("repae export runs/qs --format onnx --out x", "--format onnx"),
    "a bad choice": ("repae sample runs/qs --labels balancd", "balancd"),
    "a missing recipe": ("repae run recipes/nope.yaml", "does not exist"),
    "an unknown recipe key": ("repae run recipes/quickstart.yaml trainer.stepz=3 --out runs/x", "trainer.stepz"),
    "components that do not fit": ("repae bench recipes/quickstart.yaml dataset.resolution=33", "does not compose"),
    "a failing command that runs": ("repae show sitt", "exited with"),
    "a failing dry run": ("repae run recipes/quickstart.yaml denoiser.depth=oops --dry-run", "exited with 2"),
    "a torchrun option misspelt": ("torchrun --nproc-per-nod 8 -m repae run recipes/quickstart.yaml",
                                   "torchrun does not take"),
    "a repae option misspelt under torchrun": (
        "torchrun --nproc-per-node 8 -m repae run recipes/quickstart.yaml --outt runs/x", ("No such option", "--outt")),
    "an extra that does not exist": ("pip install -e '.[tests]'", "no extra 'tests'"),
    "a package repae does not use": ("pip install tensorflow", "neither repae nor"),
    "a benchmark option that does not exist": ("python benchmarks/cli_latency.py --repeats 5", "no option --repeats"),
    "a benchmark that does not exist": ("python benchmarks/nope.py", "no script"),
    "an undeclared pytest marker": ("pytest -m 'not slw'", "no marker slw"),
    "an unmarked download": ("hf download REPA-E/sdvae sdvae-f8d4.pt", "mark the block"),
}


def test_the_checker_catches_each_kind_of_mistake(tmp_path, monkeypatch, fake_dists):
    """One document of wrong commands, one per line: each is reported, with its reason, and nothing else is."""
    doc = "docs/x.md"
    text = "```bash\n" + "\n".join(line for line, _ in MISTAKES.values()) + "\n```\n"
    commands, problems = check_docs([doc], tmp_path, monkeypatch, fake_dists, {doc: text})
    assert len(commands) == len(MISTAKES) and len(problems) == len(MISTAKES), problems
    for number, (mistake, (line, why)) in enumerate(MISTAKES.items(), start=2):
        (found,) = [p for p in problems if p.startswith(f"{doc}:{number}: ")]
        assert all(part in found for part in ((why,) if isinstance(why, str) else why)), (mistake, line, found)
    assert not any(c.outcome for c in commands)


def test_the_checker_runs_validates_and_skips_as_marked(tmp_path, monkeypatch, fake_dists):
    doc = "docs/x.md"
    text = """
```bash
repae list sampler && repae show euler   # two commands, run
OMP_NUM_THREADS=1 time repae run recipes/quickstart.yaml trainer.steps=2 --out runs/q 2>&1 | tee log.txt
wget https://example.com/x.pt   # docs-test: skip (needs network)
```

<!-- docs-test: skip (needs ImageNet) -->
```sh
repae prepare-data /data/imagenet/train --out data/in --no-such-option
```

```text
$ repae --version
repae 0.1.0
```

<!-- docs-test: skip -->
```bash
repae list
```
"""
    commands, problems = check_docs([doc], tmp_path, monkeypatch, fake_dists, {doc: text})
    outcomes = [(c.words[0] if c.words[0] != "OMP_NUM_THREADS=1" else c.words[2], c.outcome) for c in commands]
    assert outcomes == [("repae", "ran"), ("repae", "ran"), ("repae", "validated"), ("tee", ""),
                        ("wget", "skipped"), ("repae", "skipped"), ("repae", "ran"), ("repae", "ran")], outcomes
    assert [c.skip for c in commands if c.skip] == ["needs network", "needs ImageNet"]
    assert len(problems) == 2, problems
    assert any("`tee` is not a command" in p for p in problems), problems
    assert any(p.startswith(f"{doc}:18: ") and "write `docs-test: skip (REASON)`" in p for p in problems), problems


if __name__ == "__main__":  # every command and what is done with it: python tests/test_docs_commands.py
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import FakeDistributions

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as scratch, pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPAE_PLUGINS", "repae")
        dists = FakeDistributions(Path(scratch) / "site", mp)
        found, failures = check_docs(DOCS, Path(scratch), mp, dists)
        for c in found:
            print(f"{c.outcome or 'FAILED':9} {c.where:38} {shlex.join(c.words)}"
                  + (f"  [{c.skip or c.note}]" if c.skip or c.note else ""))
        print(summary(found))
        print("\n".join(failures))
        sys.exit(1 if failures else 0)
