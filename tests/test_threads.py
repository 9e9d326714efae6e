"""The CPU thread choice of the ``repae`` command (repae/_threads.py): set before torch loads, the user's settings
kept, the same count on the same machine whatever its load."""

from __future__ import annotations

import subprocess
import sys

import pytest

from repae._threads import ENV, choose_threads, configure_cpu_threads, usable_cores
from repae.errors import UserError


def test_choice_depends_on_cores_only():
    assert [choose_threads(n) for n in (1, 2, 3, 4, 16)] == [1, 1, 2, 3, 15]
    assert 1 <= usable_cores() <= (__import__("os").cpu_count() or 1)


def test_sets_what_the_user_did_not():
    env: dict[str, str] = {}
    assert configure_cpu_threads(env) == {"OMP_WAIT_POLICY": "PASSIVE",
                                          "OMP_NUM_THREADS": str(choose_threads(usable_cores()))}
    env = {"OMP_NUM_THREADS": "4"}  # the user's (or torchrun's) count is kept
    assert configure_cpu_threads(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env["OMP_NUM_THREADS"] == "4"
    env = {ENV: "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_cpu_threads(env) == {"OMP_NUM_THREADS": "3"} and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {ENV: "torch"}
    assert configure_cpu_threads(env) == {} and env == {ENV: "torch"}


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_value_names_the_variable_and_the_choices(value):
    with pytest.raises(UserError, match=rf"{ENV}='{value}' is not a thread count; .*'auto'.*'torch'"):
        configure_cpu_threads({ENV: value})


def _threads_after_command(env_extra: dict[str, str]) -> str:
    script = ("import os, sys\nsys.argv = ['repae', '--version']\nfrom repae.cli import main\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\nimport torch\n"
              "print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", ENV)}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_the_command_sets_threads_before_torch_loads():
    assert _threads_after_command({}) == f"{choose_threads(usable_cores())} PASSIVE"
    assert _threads_after_command({ENV: "2"}) == "2 PASSIVE"
    assert _threads_after_command({ENV: "2", "OMP_NUM_THREADS": "1"}) == "1 PASSIVE"  # the user's OMP_NUM_THREADS


def test_bad_value_is_a_message_not_a_traceback():
    done = subprocess.run([sys.executable, "-m", "repae", "list"], env={**__import__("os").environ, ENV: "many"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{ENV}='many' is not a thread count" in done.stderr
