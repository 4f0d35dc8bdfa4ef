"""Options as dataclasses: every worker flag given to `zdepth serve` reaches each worker it starts."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from zdepth import serve
from zdepth.cli import build_parser
from zdepth.config import WorkerOptions, add_arguments, flag, from_args, option, option_fields, to_argv


def _worker_action(name: str) -> argparse.Action:
    """The `zdepth worker` parser's action for option `name`."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in commands.choices["worker"]._actions if a.dest == name)


def _other_value(f: dataclasses.Field) -> list[str]:
    """Flags that set option `f` to a value other than its default, built from the worker's parser."""
    action = _worker_action(f.name)
    if isinstance(action, argparse._StoreTrueAction):
        return [flag(f)]
    if action.choices:
        return [flag(f), next(c for c in action.choices if c != action.default)]
    if isinstance(action, argparse._AppendAction):
        return [flag(f), "vitb:vkitti", flag(f), "vits:relative"]
    if action.type is int:
        return [flag(f), str((action.default or 0) + 3)]
    if action.type is float:
        return [flag(f), str((action.default or 0) + 0.25)]
    valid = {"device": "cpu", "warmup_shapes": "480x640,720x1280@518"}  # strings their type checks
    return [flag(f), valid.get(f.name, f"other-{f.name}")]


def test_every_worker_flag_given_to_serve_reaches_the_worker():
    given = [arg for f in option_fields(WorkerOptions) for arg in _other_value(f)]
    expected = from_args(WorkerOptions, build_parser().parse_args(["worker", "--connect", "ipc://x", *given]))
    defaults = WorkerOptions()
    differing = [f.name for f in option_fields(WorkerOptions) if getattr(expected, f.name) == getattr(defaults, f.name)]
    assert differing == []  # each flag really moved its option off the default

    args = build_parser().parse_args(["serve", "--workers", "2", *given])
    commands = [serve.worker_command(w, "ipc://x", f"worker-{i}") for i, w in enumerate(serve.serve_workers(args))]
    assert len(commands) == 2
    for command in commands:
        assert command[1:4] == ["-m", "zdepth", "worker"]
        started = build_parser().parse_args(command[3:])  # what the worker process parses
        assert from_args(WorkerOptions, started) == expected
        assert started.connect == "ipc://x"


def test_serve_shares_the_cpu_cores_among_cpu_workers_unless_told():
    args = build_parser().parse_args(["serve", "--device", "cpu", "--workers", "2"])
    workers = serve.serve_workers(args)
    assert [w.device for w in workers] == ["cpu", "cpu"] and all(w.threads >= 1 for w in workers)
    args = build_parser().parse_args(["serve", "--device", "cpu", "--workers", "2", "--threads", "3"])
    assert [w.threads for w in serve.serve_workers(args)] == [3, 3]


def test_options_round_trip_through_argv():
    @dataclasses.dataclass
    class Options:
        size: int = option(7, "a number")
        ratio: float = option(0.5, "a fraction")
        name: str = option("a", "a name", choices=("a", "b"))
        on: bool = option(False, "a switch")
        items: list = option(factory=list, help="repeatable")
        limit: int = option(None, "optional", type=int)

    parser = argparse.ArgumentParser()
    add_arguments(parser, Options)
    assert from_args(Options, parser.parse_args([])) == Options()
    changed = Options(size=9, ratio=1.25, name="b", on=True, items=["x", "y z"], limit=4)
    assert to_argv(Options()) == ["--size", "7", "--ratio", "0.5", "--name", "a"]
    assert from_args(Options, parser.parse_args(to_argv(changed))) == changed


def test_a_switch_that_defaults_to_true_is_refused():
    @dataclasses.dataclass
    class Bad:
        on: bool = option(True, "cannot be turned off")

    with pytest.raises(TypeError, match="switch"):
        add_arguments(argparse.ArgumentParser(), Bad)
