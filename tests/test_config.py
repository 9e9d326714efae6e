"""Typed component configs: parsing every kind of field, reporting all problems, describing fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from repae.config import config_to_dict, describe_config, option, parse_config


@dataclass(kw_only=True)
class Inner:
    width: int = option(8, doc="width")


@dataclass(kw_only=True)
class Example:
    size: str = option("B/2", doc="preset")
    depth: int = option(12, doc="blocks")
    lr: float = option(1e-4, doc="learning rate")
    compile: bool = option(False, doc="torch.compile")
    mode: Literal["ode", "sde"] = option("ode", doc="sampler")
    dims: list[int] = option(default_factory=lambda: [768], doc="encoder dims")
    betas: tuple[float, float] = option((0.9, 0.999), doc="adam betas")
    weights: str | None = option(None, doc="checkpoint")
    inner: Inner = option(default_factory=Inner, doc="nested")
    required_root: str = option(doc="must be given")

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError("depth must be >= 1")


def test_valid_values_are_converted_losslessly():
    config, issues = parse_config(Example, {"required_root": "/data", "lr": 1, "betas": [0.9, 0.95], "inner": {"width": 4}})
    assert issues == []
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.betas == (0.9, 0.95)
    assert config.inner == Inner(width=4)


def test_every_problem_is_reported_at_once():
    _, issues = parse_config(
        Example,
        {"depht": 3, "lr": "fast", "compile": 1, "mode": "odee", "dims": [1, "x"], "betas": [0.9], "inner": {"wdth": 1}},
    )
    by_path = {i.path: i for i in issues}
    assert set(by_path) == {"depht", "lr", "compile", "mode", "dims.1", "betas", "inner.wdth", "required_root"}
    assert "depth" in by_path["depht"].hint
    assert "expected float" in by_path["lr"].message
    assert "expected bool" in by_path["compile"].message  # 1 is not a bool
    assert "'ode'" in by_path["mode"].hint
    assert "required" in by_path["required_root"].message
    assert "width" in by_path["inner.wdth"].hint


def test_bool_is_not_an_int_and_none_only_where_optional():
    _, issues = parse_config(Example, {"required_root": "x", "depth": True, "size": None})
    assert {i.path for i in issues} == {"depth", "size"}
    config, issues = parse_config(Example, {"required_root": "x", "weights": None})
    assert issues == [] and config.weights is None


def test_post_init_errors_become_issues():
    _, issues = parse_config(Example, {"required_root": "x", "depth": 0})
    assert [i.message for i in issues] == ["depth must be >= 1"]


def test_describe_and_round_trip():
    fields = {f.name: f for f in describe_config(Example)}
    assert fields["depth"].type == "int" and fields["depth"].default == 12 and fields["depth"].doc == "blocks"
    assert fields["mode"].type == "'ode' | 'sde'"
    assert fields["weights"].type == "str | null"
    assert fields["required_root"].required
    config, _ = parse_config(Example, {"required_root": "x"})
    data = config_to_dict(config)
    assert data["betas"] == [0.9, 0.999] and data["inner"] == {"width": 8}
    again, issues = parse_config(Example, data)
    assert issues == [] and again == config


def test_mutable_default_is_refused():
    with pytest.raises(TypeError, match="default_factory"):
        option([1, 2])
