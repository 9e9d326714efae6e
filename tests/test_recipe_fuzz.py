"""Recipe fuzzing: a seeded generator of mutated recipes (issue 10, deliverable 6).

Every mutation of ``recipes/quickstart.yaml`` and ``recipes/repae_sdvae_dinov2.yaml`` (deleted keys, typos at every
depth, wrong types, wrong nesting, zero/negative/huge/non-finite values, unknown components, bad YAML, non-UTF-8
bytes, empty files, huge and deeply nested files, alias bombs, missing and cyclic ``extends``, bad overrides) goes
through ``repae recipe validate`` in process. Each must either pass (exit 0) or exit 2 with a message naming the file
(or the command-line override) and, when the mutation targets a key, that key path; never a traceback. A seeded
subset also goes through ``repae run --dry-run``, which must reach the same verdict as ``validate``.
"""

from __future__ import annotations

import codecs
import gzip
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT

SEED = 20240610
DRY_RUN_SAMPLE = 12
HEADS = ("quickstart.yaml", "repae_sdvae_dinov2.yaml")


@dataclass
class Mutation:
    """One fuzzed input: the recipe file to run (relative to the copied ``recipes/``), files to (over)write there,
    overrides, and the key path the mutation targets (which an error must name)."""

    kind: str
    label: str
    recipe: str
    files: dict[str, bytes] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    key: str | None = None

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.recipe}:{self.label}"


def _leaves(data: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every key and list item, parents before children."""
    out: list[tuple[tuple, Any]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append((prefix + (k,), v))
            out.extend(_leaves(v, prefix + (k,)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.append((prefix + (i,), v))
            out.extend(_leaves(v, prefix + (i,)))
    return out


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _get(data: Any, path: tuple) -> Any:
    for p in path:
        data = data[p]
    return data


def _dump(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False).encode()


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word + "x"
    i = rng.randrange(len(word) - 1)
    swapped = word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return swapped if swapped != word else word + "x"


def _merged(name: str) -> dict:
    """The merged (extends applied) data of a shipped recipe, to find keys to override."""
    from repae.recipe import load_source

    return load_source(ROOT / "recipes" / name).data


def mutations() -> list[Mutation]:
    """The seeded, deterministic list of mutations."""
    rng = random.Random(SEED)
    out: list[Mutation] = []
    for head in HEADS:
        text = (ROOT / "recipes" / head).read_bytes()
        own = yaml.safe_load(text)
        merged = _merged(head)
        own_paths = [(p, v) for p, v in _leaves(own) if p[0] != "extends"]
        merged_paths = _leaves(merged)
        scalars = [(p, v) for p, v in merged_paths if isinstance(v, (int, float, str, bool)) and not
                   isinstance(p[-1], int)]
        numbers = [(p, v) for p, v in scalars if isinstance(v, (int, float)) and not isinstance(v, bool)]

        def add(kind: str, label: str, **kw: Any) -> None:
            out.append(Mutation(kind, label, head, **kw))

        # deleted keys (in the file itself, at every depth) and deletions by override (null)
        for path, _ in own_paths:
            data = yaml.safe_load(text)
            parent = _get(data, path[:-1])
            del parent[path[-1]]
            add("delete", _dotted(path), files={head: _dump(data)})
        for path, _ in rng.sample(scalars, 6):
            add("delete", "override " + _dotted(path), overrides=[f"{_dotted(path)}=null"])
        # typos in keys, at every depth
        for path, _ in own_paths:
            if isinstance(path[-1], int):
                continue
            data = yaml.safe_load(text)
            parent = _get(data, path[:-1])
            wrong = _typo(path[-1], rng)
            parent[wrong] = parent.pop(path[-1])
            add("typo", _dotted(path), files={head: _dump(data)}, key=_dotted(path[:-1] + (wrong,)))
        for path, _ in rng.sample(scalars, 6):
            wrong = path[:-1] + (_typo(path[-1], rng),)
            add("typo", "override " + _dotted(wrong), overrides=[f"{_dotted(wrong)}=1"], key=_dotted(wrong))
        # wrong types
        for path, value in rng.sample(scalars, 14):
            bad = rng.choice(["[1, 2]", "{a: 1}", "not-a-number" if not isinstance(value, str) else "3", "true"])
            add("type", f"{_dotted(path)}={bad}", overrides=[f"{_dotted(path)}={bad}"], key=_dotted(path))
        # wrong nesting: a leaf moved one level down or up, a section given as a list
        for path, value in rng.sample(scalars, 5):
            if len(path) < 2:
                continue
            data = yaml.safe_load(text)
            add("nesting", f"{_dotted(path)} one level up",
                overrides=[f"{_dotted(path[:-2] + (path[-1],))}={yaml.safe_dump(value).splitlines()[0]}"],
                key=_dotted(path[:-2] + (path[-1],)))
        for section in ("denoiser", "trainer", "sampler"):
            add("nesting", f"{section} as a list", overrides=[f"{section}=[{section}]"], key=section)
            add("nesting", f"{section} one level deeper", overrides=[f"{section}.inner.name=x"],
                key=f"{section}.inner")
        # zero / negative / huge / non-finite numbers
        for path, _ in rng.sample(numbers, min(len(numbers), 14)):
            bad = rng.choice(["0", "-1", "1.0e308", "123456789012", ".nan", ".inf", "-.inf"])
            add("value", f"{_dotted(path)}={bad}", overrides=[f"{_dotted(path)}={bad}"], key=_dotted(path))
        # unknown components
        for path, _ in [(p, v) for p, v in merged_paths if p[-1] == "name"]:
            add("component", _dotted(path), overrides=[f"{_dotted(path)}={_typo(_get(merged, path), rng)}zz"],
                key=_dotted(path))
        # bad overrides
        for bad in ["denoiser.depth", "=3", "denoiser..depth=3", "encoders.7.size=tiny", "seed.x=1",
                    "trainer.batch_size=[", "denoiser.depth=\"12", "losses.repa.weight.=1"]:
            add("override", bad, overrides=[bad])
    # whole-file damage, on the quickstart (its own file) and the headline (through one of its bases)
    for head, victim in (("quickstart.yaml", "quickstart.yaml"), ("repae_sdvae_dinov2.yaml", "_base/imagenet256.yaml"),
                         ("quickstart.yaml", "_base/repae_losses.yaml")):
        text = (ROOT / "recipes" / victim).read_bytes()
        body = text.decode()

        def add_file(kind: str, label: str, data: bytes) -> None:
            out.append(Mutation(kind, f"{victim}: {label}", head, files={victim: data}))

        add_file("yaml", "truncated", text[: len(text) * 2 // 3])
        add_file("yaml", "tab indent", body.replace("\n  ", "\n\t", 1).encode())
        add_file("yaml", "unclosed bracket", body.replace("}", "", 1).encode())
        add_file("yaml", "two documents", text + b"\n---\nseed: 1\n")
        add_file("yaml", "stray colon", text + b"\n: : :\n")
        add_file("yaml", "duplicate key", text + b"\nseed: 3\nseed: 4\n")
        add_file("yaml", "a python tag", text + b"\nseed: !!python/object/apply:os.system [echo hi]\n")
        add_file("encoding", "latin-1", ("# r\u00e9sum\u00e9 caf\u00e9\n" + body).encode("latin-1"))
        add_file("encoding", "utf-16 with BOM", body.encode("utf-16"))
        add_file("encoding", "utf-16-le without BOM", body.encode("utf-16-le"))
        add_file("encoding", "utf-8 with BOM", codecs.BOM_UTF8 + text)
        add_file("encoding", "binary", bytes(rng.randrange(256) for _ in range(512)))
        add_file("encoding", "gzip", gzip.compress(text, mtime=0))
        add_file("encoding", "NUL character", text[:20] + b"\x00" + text[20:])
        add_file("encoding", "control character", text[:20] + b"\x07" + text[20:])
        add_file("empty", "empty file", b"")
        add_file("empty", "whitespace", b"  \n\n \n")
        add_file("empty", "comment only", b"# nothing here\n")
        add_file("empty", "a list", b"- 1\n- 2\n")
        add_file("empty", "a scalar", b"42\n")
        add_file("size", "2 MiB of comments", text + b"#" * (2 << 20) + b"\n")
        add_file("size", "5000-deep nesting", b"seed: " + b"[" * 5000 + b"]" * 5000 + b"\n")
        add_file("size", "5000-deep mappings", b"description: " + b"{a: " * 5000 + b"1" + b"}" * 5000 + b"\n")
        laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        laughs += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 10)]
        add_file("size", "billion laughs", ("\n".join(laughs) + "\n").encode())
        add_file("size", "a long line", b"description: " + b"x" * (2 << 20) + b"\n")
    # extends: missing, cyclic, wrong types, a directory
    for head, line in (("quickstart.yaml", b"extends: _base/repae_losses.yaml"),
                       ("repae_sdvae_dinov2.yaml", None)):
        text = (ROOT / "recipes" / head).read_bytes()

        def add_ext(label: str, data: bytes, files: dict[str, bytes] | None = None) -> None:
            # a broken base file is named itself; a broken `extends` value is named by its key
            key = None if label.endswith(" base") else "extends"
            out.append(Mutation("extends", label, head, files={head: data, **(files or {})}, key=key))

        def set_extends(value: str) -> bytes:
            lines = [ln for ln in text.decode().splitlines() if not ln.startswith(("extends", "          _base"))]
            return ("extends: " + value + "\n" + "\n".join(lines) + "\n").encode()

        add_ext("missing base", set_extends("_base/nope.yaml"))
        add_ext("missing in a list", set_extends("[_base/repae_losses.yaml, _base/nope.yaml]"))
        add_ext("self", set_extends(head))
        add_ext("cycle of two", set_extends("_cycle.yaml"), {"_cycle.yaml": f"extends: {head}\n".encode()})
        add_ext("a number", set_extends("3"))
        add_ext("a mapping", set_extends("{a: b}"))
        add_ext("a directory", set_extends("_base"))
        add_ext("absolute missing", set_extends("/nonexistent/base.yaml"))
        add_ext("binary base", set_extends("_bin.yaml"), {"_bin.yaml": b"\xff\xfe\x00\x01" * 64})
        add_ext("latin-1 base", set_extends("_latin.yaml"), {"_latin.yaml": "# caf\u00e9\nseed: 1\n".encode("latin-1")})
        add_ext("empty base", set_extends("_empty.yaml"), {"_empty.yaml": b""})
        del line
    # semantic refusals the issue measured
    semantic = [
        ("quickstart.yaml", "dataset.resolution=36", "dataset.resolution"),
        ("quickstart.yaml", "tokenizer.weights=/nonexistent/vae.safetensors", "tokenizer.weights"),
        ("quickstart.yaml", "denoiser.weights=missing/sit.pt", "denoiser.weights"),
        ("quickstart.yaml", "trainer.optimizers.defualt.lr=1e-3", "trainer.optimizers"),
        ("quickstart.yaml", "trainer.optimizers.default.lr=.nan", "trainer.optimizers.default.lr"),
        ("quickstart.yaml", "trainer.optimizers.default.lr=.inf", "trainer.optimizers.default.lr"),
        ("quickstart.yaml", "trainer.optimizers.default.betas=[0.9, 1.5]", "trainer.optimizers.default.betas"),
        ("quickstart.yaml", "trainer.optimizers.default.eps=0", "trainer.optimizers.default.eps"),
        ("quickstart.yaml", "trainer.optimizers.default.weight_decay=-1", "trainer.optimizers.default.weight_decay"),
        ("quickstart.yaml", "trainer.sample_count=0", "trainer.sample_count"),
        ("quickstart.yaml", "trainer.num_workers=-1", "trainer.num_workers"),
        ("quickstart.yaml", "trainer.clip_grad_norm=-1", "trainer.clip_grad_norm"),
        ("quickstart.yaml", "denoiser.mlp_ratio=-1", "denoiser.mlp_ratio"),
        ("quickstart.yaml", "denoiser.projector_dim=0", "denoiser.projector_dim"),
        ("quickstart.yaml", "tokenizer.ch=0", "tokenizer.ch"),
        ("quickstart.yaml", "tokenizer.num_res_blocks=0", "tokenizer.num_res_blocks"),
        ("quickstart.yaml", "tokenizer.ch_mult=[]", "tokenizer.ch_mult"),
        ("quickstart.yaml", "tokenizer.norm_groups=0", "tokenizer.norm_groups"),
        ("quickstart.yaml", "losses.repa.weight=-1", "losses.repa.weight"),
        ("quickstart.yaml", "losses.kl.weight=.nan", "losses.kl.weight"),
        ("quickstart.yaml", "sampler.cfg_scale=.inf", "sampler.cfg_scale"),
        ("quickstart.yaml", "sampler.guidance_high=2", "sampler.guidance_high"),
        ("quickstart.yaml", "latent_norm.momentum=.nan", "latent_norm.momentum"),
        ("quickstart.yaml", "encoders.0.token_stride=0", "encoders.0.token_stride"),
        ("repae_sdvae_dinov2.yaml", "dataset.resolution=260", "dataset.resolution"),
        ("repae_sdvae_dinov2.yaml", "losses.gan.weights=./missing-disc.pt", "losses.gan.weights"),
        ("repae_sdvae_dinov2.yaml", "tokenizer.weights=hf://", "tokenizer.weights"),
    ]
    for head, override, key in semantic:
        out.append(Mutation("semantic", override, head, overrides=[override], key=key))
    return _thin(out)


THIN = {"delete": 8, "typo": 2, "nesting": 2, "value": 2, "semantic": 2}
"""Keep every n-th mutation of these kinds (per recipe): a mutation that passes validation builds every component and
runs one step on meta (seconds each), and these kinds mostly pass or repeat each other."""


def _thin(mutations: list[Mutation]) -> list[Mutation]:
    seen: Counter = Counter()
    out = []
    for m in mutations:
        n = THIN.get(m.kind, 1)
        if seen[(m.kind, m.recipe)] % n == 0:
            out.append(m)
        seen[(m.kind, m.recipe)] += 1
    return out


# ---------------------------------------------------------------------------------------------------------------------


_WHERE = re.compile(r"(\.ya?ml\b|command line)")


@dataclass
class Outcome:
    code: int
    output: str
    traceback: bool


@pytest.fixture(scope="module")
def recipes_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(ROOT / "recipes", root / "recipes")
    return root / "recipes"


def _run(command: list[str], mutation: Mutation, pristine: Path, work: Path) -> Outcome:
    from typer.testing import CliRunner

    from repae.cli import app

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)
    for name, data in mutation.files.items():
        (work / name).write_bytes(data)
    args = [*command, str(work / mutation.recipe), *mutation.overrides]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400", "HF_HUB_OFFLINE": "1"})
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    output = result.output
    if crashed:
        import traceback

        output += "".join(traceback.format_exception(result.exception))
    return Outcome(result.exit_code, output, crashed or "Traceback" in result.output)


def _verdict(mutation: Mutation, outcome: Outcome) -> str | None:
    """Why the outcome is wrong (``None`` when it is right)."""
    if outcome.traceback:
        return "traceback"
    if outcome.code not in (0, 2):
        return f"exit code {outcome.code}"
    if outcome.code == 2:
        if not _WHERE.search(outcome.output):
            return "the error names no file and no command-line override"
        if mutation.key and not _names_key(mutation.key, outcome.output):
            return f"the error does not name the key path {mutation.key}"
    return None


def _names_key(key: str, output: str) -> bool:
    """The output names ``key``: the dotted path, or its parent's path and the last key quoted (``trainer.optimizers
    names ['defualt']``), or, for a misspelt ``name``, the section's missing ``name``."""
    parent, _, last = key.rpartition(".")
    if key in output or (parent and parent in output and repr(last) in output):
        return True
    return bool(parent) and f"{parent}.name: missing" in output


def _outcome_kind(outcome: Outcome) -> str:
    return "traceback" if outcome.traceback else "ok" if outcome.code == 0 else f"exit {outcome.code}"


def test_generator_is_deterministic_and_covers_every_kind():
    first, second = mutations(), mutations()
    assert [m.id for m in first] == [m.id for m in second]
    assert [m.files for m in first] == [m.files for m in second]
    kinds = Counter(m.kind for m in first)
    assert len(first) >= 150, kinds
    for kind in ("delete", "typo", "type", "nesting", "value", "component", "override", "yaml", "encoding", "empty",
                 "size", "extends", "semantic"):
        assert kinds[kind] >= 3, kinds


def test_fuzzed_recipes_validate_cleanly(recipes_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    all_mutations = mutations()
    wrong: list[str] = []
    tally: Counter = Counter()
    codes: dict[str, int] = {}
    for mutation in all_mutations:
        outcome = _run(["recipe", "validate"], mutation, recipes_copy, tmp_path / "recipes")
        tally[(mutation.kind, _outcome_kind(outcome))] += 1
        codes[mutation.id] = outcome.code
        reason = _verdict(mutation, outcome)
        if mutation.kind in ("encoding", "size", "extends", "semantic", "empty") and outcome.code == 0:
            if not (mutation.kind in ("empty", "encoding") and "utf-8 with BOM" in mutation.label
                    or mutation.kind == "empty" and "repae_losses" in mutation.label):
                reason = reason or "accepted, but it cannot train"
        if reason:
            wrong.append(f"{mutation.id}: {reason}\n{outcome.output[-1500:]}")
    rng = random.Random(SEED + 1)
    for mutation in rng.sample(all_mutations, DRY_RUN_SAMPLE):
        outcome = _run(["run", "--dry-run"], mutation, recipes_copy, tmp_path / "recipes")
        reason = _verdict(mutation, outcome)
        if reason is None and outcome.code != codes[mutation.id]:
            reason = f"the dry run exits {outcome.code} where validate exited {codes[mutation.id]}"
        if reason:
            wrong.append(f"dry run {mutation.id}: {reason}\n{outcome.output[-1500:]}")
    summary = "\n".join(f"  {k[0]:<10} {k[1]:<10} {n}" for k, n in sorted(tally.items()))
    assert not wrong, f"{len(wrong)} of {len(all_mutations)} mutation(s) mishandled:\n" + "\n\n".join(wrong) + \
        f"\n\noutcomes by kind:\n{summary}"
