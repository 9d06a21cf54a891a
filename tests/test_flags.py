"""Every flag of every command, walked from the parsers themselves: each explains itself in --help,
and each number (a declared type and range, common.RANGES) given a zero, a negative, a NaN and a
huge value either parses to a value in its range or ends the command with one line naming the
flag. No traceback, no silent acceptance of a value outside the range."""
import argparse
import ast
import glob
import importlib
import os
import re
import subprocess

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


def import_graph():
    """{file relative to ROOT: the top-level modules it imports}, for the top level and bench/."""
    mods = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    imports = {}
    for path in [os.path.join(ROOT, m + ".py") for m in mods] + [
            os.path.join(ROOT, "bench", f) for f in os.listdir(os.path.join(ROOT, "bench"))
            if f.endswith(".py")]:
        tree = ast.parse(open(path).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                      if isinstance(n, ast.ImportFrom) and n.module}
        imports[os.path.relpath(path, ROOT)] = names & mods - {path[len(ROOT) + 1:-3]}
    return imports


def library_floors():
    """{library: its floor}: 0 for a library that imports none, else one above its highest import
    (asserting there is no circle on the way)."""
    libs = {f[:-3]: n for f, n in import_graph().items()
            if "/" not in f and f[:-3] not in COMMANDS}
    floors, busy = {}, []

    def floor(m):
        assert m not in busy, f"import circle: {' -> '.join(busy + [m])}"
        if m not in floors:
            busy.append(m)
            floors[m] = 1 + max((floor(n) for n in libs[m]), default=-1)
            busy.pop()
        return floors[m]
    for m in libs:
        floor(m)
    return floors


def test_commands_are_leaves_and_libraries_have_no_circle():
    """README's Layout rule, from the files' own imports: no command imports a command, bench/
    imports no command, and the libraries' imports form no circle."""
    for f, names in import_graph().items():
        assert not names & set(COMMANDS), f"{f} imports the command(s) {names & set(COMMANDS)}"
    assert library_floors()


def test_readme_layout_lists_every_file_and_the_floors_as_they_are():
    """README's Layout: its table names every top-level file and no file that is gone, its list
    of commands is COMMANDS, and its floors are the floors of the libraries' own imports."""
    text = open(os.path.join(ROOT, "README.md")).read()
    layout = text.split("## Layout")[1].split("\n## ")[0]
    named = set(re.findall(r"`(\w+)\.py`", layout.split("| file | what |")[1]))
    files = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert named == files, f"table lacks {files - named}, names missing {named - files}"
    commands = layout.split("a command (")[1].split(")")[0]
    assert set(re.findall(r"`(\w+)`", commands)) == set(COMMANDS)
    said = layout.split("floor by floor:")[1].split("(tests/")[0]
    floors = [set(re.findall(r"`(\w+)`", f)) for f in said.split("→")]
    got = library_floors()
    assert floors == [{m for m in got if got[m] == i} for i in range(max(got.values()) + 1)]


def product_files():
    return sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench",
                                                                            "*.py")))


def test_no_function_is_over_60_lines():
    """A function is read whole: none in the product (top level and bench/) over 60 lines, its
    def line to its last."""
    long = [f"{os.path.relpath(p, ROOT)}:{n.name} {n.end_lineno - n.lineno + 1}"
            for p in product_files() for n in ast.walk(ast.parse(open(p).read()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_a_small_library_serves_more_than_one_file():
    """A library under 100 lines with a single consumer in the product is a section of that
    consumer, not a file of its own (analyses.py holds the official code's small analyses)."""
    graph = import_graph()
    for m in library_floors():
        lines = open(os.path.join(ROOT, m + ".py")).read().count("\n")
        users = [f for f, names in graph.items() if m in names]
        assert lines >= 100 or len(users) >= 2, f"{m}.py: {lines} lines, used by {users} only"


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


BENCH = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "bench"))
               if f.endswith(".py") and f != "__init__.py"
               and "def parser():" in open(os.path.join(ROOT, "bench", f)).read())


def test_every_bench_script_describes_itself_and_each_flag():
    """Each bench script that takes flags has a description and a help line per flag that says
    more than the flag's name."""
    assert {"bench_eval", "bench_lora", "bench_model", "bench_sae", "bench_train", "gpu"} <= set(
        BENCH)
    for name in BENCH:
        p = importlib.import_module(f"bench.{name}").parser()
        assert p.description and len(p.description) > 40, name
        for a in p._actions:
            if a.dest != "help":
                words = (a.help or "").replace("-", " ").replace("_", " ").split()
                assert len(words) > 2, f"bench/{name}.py {a.option_strings}: {a.help!r}"


def test_the_bench_commands_of_the_docs_answer_help(capsys):
    """Every command of docs/benchmarks.md's list runs as written up to its --help: the module
    resolves, its flags parse; bench/gpu.sh --help prints its usage and starts nothing."""
    text = open(os.path.join(ROOT, "docs", "benchmarks.md")).read().split("```bash\n")[1]
    cmds = [l.split("#")[0].split() for l in text.split("```")[0].splitlines() if l.strip()]
    assert len(cmds) >= 7
    for c in cmds:
        if c[:2] == ["bash", "bench/gpu.sh"]:
            out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), *c[2:],
                                  "--help"], capture_output=True, text=True, timeout=30)
            assert out.returncode == 0 and "bash bench/gpu.sh --cpu" in out.stdout, out
            continue
        assert c[:2] == ["python", "-m"] and c[2].startswith("bench."), c
        with pytest.raises(SystemExit) as e:
            importlib.import_module(c[2]).main(c[3:] + ["--help"])
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out, c
