"""Every flag of every command, walked from the parsers themselves: each explains itself in --help,
and each number (a declared type and range, common.RANGES) given a zero, a negative, a NaN and a
huge value either parses to a value in its range or ends the command with one line naming the
flag. No traceback, no silent acceptance of a value outside the range."""
import argparse
import ast
import importlib
import os

import pytest

from common import check_number
from helpers import ROOT

# the commands: the top-level files that run as scripts (their `__main__` guard), so that a new
# command is walked and held to the layout rule without being listed by hand
COMMANDS = tuple(sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and
                        'if __name__ == "__main__":' in open(os.path.join(ROOT, f)).read()))
BAD = ("0", "-1", "nan", "-inf", "1e30", str(2**70))


def walk(parser, path=()):
    """(subcommand path, parser, action) of every flag, subcommands included."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from walk(sub, path + (name,))
        elif a.option_strings or a.dest != "help":
            yield path, parser, a


def flags():
    for name in COMMANDS:
        for path, parser, action in walk(importlib.import_module(name).parser()):
            yield name, path, parser, action


def required(parser):
    """argv that satisfies the parser's required flags and positionals with placeholders."""
    argv = []
    for a in parser._actions:
        if a.option_strings and a.required:
            argv += [a.option_strings[0], "x"]
        elif not a.option_strings and not isinstance(a, argparse._SubParsersAction):
            argv.append("x")
    return argv


def test_commands_are_found_from_their_main_guards():
    assert set(COMMANDS) >= {"train", "eval", "ablate", "collect", "sae", "interpret", "dashboard",
                             "report", "rollout", "export", "demo", "rehearse"}
    assert not set(COMMANDS) & {"common", "model", "lora", "recipe", "protocols"}  # libraries


def test_a_config_field_without_an_explanation_is_refused():
    """A config field's --help is its comment: a field without one would print only its name,
    so add_config_flags refuses it (naming the class and field)."""
    from dataclasses import dataclass

    from common import Parser, add_config_flags

    @dataclass
    class Config:
        explained: int = 1  # what it does, in units
        bare: float = 0.5

    with pytest.raises(TypeError, match="Config.bare: no comment on its line to explain it"):
        add_config_flags(Parser(), Config)


def test_every_flag_has_help():
    missing = [f"{name} {' '.join(path)} {a.option_strings or a.dest}"
               for name, path, _, a in flags()
               if a.dest != "help" and not (a.help or "").strip()]
    assert not missing, missing


def test_every_number_flag_is_in_range_or_one_line(capsys):
    walked = 0
    for name, path, parser, a in flags():
        kind = getattr(a.type, "kind", None)
        if kind is None:
            continue
        walked += 1
        flag = a.option_strings[0]
        for value in BAD:
            argv = [*path, *required(parser), flag, value]
            try:
                ns = importlib.import_module(name).parser().parse_args(argv)
            except SystemExit as e:
                err = capsys.readouterr().err
                assert e.code == 2 and err.count("\n") == 1 and flag in err, (name, argv, err)
                assert "Traceback" not in err
                continue
            got = getattr(ns, a.dest)
            for v in got if isinstance(got, list) else [got]:
                check_number(v, kind)  # what parsed lies in the declared range
    assert walked >= 60  # the walk reaches the config-generated flags too


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "nan"], "--lr"), (["--seed", "-1"], "--seed"), (["--beta2", "1"], "--beta2"),
    (["--global-batch", "0"], "--global-batch"), (["--preset", "nope"], "--preset")])
def test_train_flags_name_themselves(argv, flag, capsys):
    from train import parse_args
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err, err


def test_config_flags_is_add_config_flags_inverse():
    """demo.py drives train.py through config_flags: what it writes parses back to the same
    settings (booleans both ways, floats exactly)."""
    from common import Parser, add_config_flags, config_flags
    from recipe import TrainConfig
    settings = dict(mode="full", lr=3e-3, epochs=1, activation_checkpointing=False, rslora=True,
                    warmup_ratio=0.05, eps=1e-8, targets="q_proj,v_proj")
    p = Parser()
    add_config_flags(p, TrainConfig)
    ns = vars(p.parse_args([str(a) for a in config_flags(settings)]))
    assert {k: ns[k] for k in settings} == settings


def test_commands_are_leaves_and_libraries_have_no_circle():
    """README's Layout rule, from the files' own imports: no command imports a command, bench/
    imports no command, and the libraries' imports form no circle."""
    mods = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    imports = {}
    for path in [os.path.join(ROOT, m + ".py") for m in mods] + [
            os.path.join(ROOT, "bench", f) for f in os.listdir(os.path.join(ROOT, "bench"))
            if f.endswith(".py")]:
        tree = ast.parse(open(path).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                      if isinstance(n, ast.ImportFrom) and n.module}
        imports[os.path.relpath(path, ROOT)] = names & mods
    for f, names in imports.items():
        assert not names & set(COMMANDS), f"{f} imports the command(s) {names & set(COMMANDS)}"
    libs = {f[:-3]: n for f, n in imports.items() if "/" not in f and f[:-3] not in COMMANDS}
    done, busy = set(), []

    def visit(m):
        assert m not in busy, f"import circle: {' -> '.join(busy + [m])}"
        if m in done:
            return
        busy.append(m)
        for n in libs.get(m, ()):
            visit(n)
        busy.pop()
        done.add(m)
    for m in libs:
        visit(m)


def test_help_shows_the_defaults_a_command_uses(capsys):
    """interpret.py steer generates with its own defaults (a 4,096-token context, temperature 0.7,
    a 256-token answer), and its --help says so rather than eval.py's; eval.py's --batch-size
    and every --device say what they default to."""
    import interpret
    from steering import STEER_GEN
    with pytest.raises(SystemExit):
        interpret.parser().parse_args(["steer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for k, v in STEER_GEN.items():
        assert f"--{k.replace('_', '-')} " in text and f"(default: {v!r})" in text, k
    assert "(default: 32768)" not in text and "auto (default: cuda where there is one" in text
    for name, path, _, a in flags():
        if a.option_strings == ["--device"]:  # config flags default to None, the field's value
            assert a.default in ("auto", None) and "auto" in a.help and "default" in a.help, name
