"""
Shared mechanics of the scripts, none of them about the paper: files (JSON, append-only logs,
writes that readers never see half of), which command made a directory, what an artifact was
made from, starting torch.distributed, the bootstrap interval, and run configurations
(dataclasses) as command-line flags. Weights on disk (safetensors, HF checkpoints): checkpoint.py.

    from common import setup_dist, print0, write_atomic, read_json, bootstrap_ci
    rank, world, device = setup_dist()          # torchrun or a plain `python x.py`
    lo, hi = bootstrap_ci(lambda i: mean(x[j] for j in i), [len(x)])

Outputs lose nothing (docs/outputs.md states it for users):
- files are written whole (temp file, fsync, rename), directories are published by a rename;
- a command writes only its own files: an --out that is, holds or lies inside one of its inputs
  is refused (check_out), and an existing output is replaced only when asked (--overwrite), and
  only when it holds nothing but what that command writes (publish_dir);
- every artifact records what it was made from (file_identity and the identities built on it),
  and its consumers compare (differences) before they resume or combine.
"""
import argparse
import fcntl
import glob
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import fields

import torch
import torch.distributed as dist
from tqdm import tqdm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -----------------------------------------------------------------------------
# files


def read_json(path, keys=(), what=None):
    """A JSON file's content; errors name the file. keys: the top-level keys that make it the kind
    of file expected (what: its name, e.g. "the recovery table of `eval.py compare --out`"), so
    that a JSON file of another kind is one line, not a KeyError later."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise ValueError(f"{path}: not {what or 'the file expected'} (no {missing[0]!r} in it)")
    return d


def write_atomic(path, data):
    """Write a file (str or bytes) through a temp file, fsync and a rename: readers never see half
    of it, and after a crash it is either the old file or the new one. An OS error (a full disk,
    a quota, a read-only file system) names the file and leaves no temp file."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # one temp file per writer thread
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, a quota, a kill: no temp file stays behind
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"writing {path}: {e.strerror}") from None
        raise


def not_a_link(path):
    """path, unless it is a symbolic link: a command appends to or repairs only files it made in
    its output directory, never a file elsewhere that a link there points to."""
    if os.path.islink(path):
        raise ValueError(f"{path}: is a link to {os.readlink(path)}; a command writes only the "
                         "files it made in its output directory (remove the link, or choose "
                         "another output)")
    return path


def remove_path(path):
    """Delete what a command made: a file, a directory and all in it, or a link itself (never the
    files a link points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def read_log(path, repair=False):
    """The rows of an append-only jsonl file (metrics, answers), [] when there is none. A last
    line without its newline is what a kill or a full disk leaves mid-write: it is not a row (its
    item is redone), and with repair (the file's writer, before it appends again) it is cut off the
    file. Damage anywhere else is an error naming the file and the line."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(not_a_link(path), "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    rows = []
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if raw.strip():
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({type(e).__name__}); only a "
                                 "cut last line is repaired, this one needs a look") from None
    return rows


def keep_steps(path, last):
    """Before a resumed run appends to its log: the rows of steps after `last` are dropped (the
    run redoes them), so that each step is logged once."""
    kept = [r for r in read_log(path, repair=True) if r["step"] <= last]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def write_json(path, obj, indent=1):
    write_atomic(path, json.dumps(obj, indent=indent))


class AppendLog:
    """An append-only log (jsonl) that survives a kill or a full disk: write() hands the text to
    the OS whole or raises an OSError naming the file (a torn last line, which read_log drops on
    the next run); nothing is buffered, so closing writes nothing; flush() is an fsync."""

    def __init__(self, path):
        self.path, self.f = path, open(not_a_link(path), "ab", buffering=0)

    def write(self, text):
        data = text.encode()
        with naming(self.path):
            while data:  # a raw write may take part of it
                data = data[self.f.write(data):]

    def flush(self):
        with naming(self.path):
            os.fsync(self.f.fileno())

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def naming(path):
    """An OSError inside that names no file (a write to an open file when the disk fills) is
    raised again naming `path`, so that user_errors' one line says which file."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def publish_dir(out_dir, write, owned, overwrite=False, flag="--overwrite", *, command):
    """Call write(tmp) on a fresh directory beside out_dir, then rename it to out_dir: there is
    never a half-written out_dir. An existing out_dir is replaced only with overwrite, only when
    `command` made it (its owner file) and only when every file in it is one that owned(name) says
    this writer writes: nothing else is lost. Temp directories that a killed writer left beside
    out_dir are removed first."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        check_owner(out_dir, command, [n for n in os.listdir(out_dir) if n != OWNER_FILE])
        foreign = sorted(n for n in os.listdir(out_dir) if not owned(n) and n != OWNER_FILE)
        if foreign:
            raise ValueError(f"{out_dir}: holds files this command did not write ({foreign[:3]}); "
                             "choose another output directory")
        if not overwrite:
            raise ValueError(f"{out_dir}: exists; pass {flag} to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, os.path.basename(out_dir))
    tag = f"{os.path.basename(out_dir)}-{socket.gethostname()}-{os.getpid()}-"
    tmp = tempfile.mkdtemp(prefix=".tmp-" + tag, dir=parent)
    try:
        write(tmp)
        write_json(os.path.join(tmp, OWNER_FILE), dict(command=command))
        if os.path.isdir(out_dir):  # only files it owns: move aside, publish, then delete
            old = tempfile.mkdtemp(prefix=".old-" + tag, dir=parent)
            os.replace(out_dir, os.path.join(old, "d"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(parent, name):
    """Delete the .tmp-/.old- directories that publish_dir made for `name` on this host in a
    process that no longer runs (killed mid-write: at 32B such a leftover holds 65 GB)."""
    host = socket.gethostname()
    for n in os.listdir(parent):
        m = re.fullmatch(r"\.(?:tmp|old)-(.+)-(\d+)-\w+", n)
        if not m or m.group(1) != f"{name}-{host}":
            continue
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


# -----------------------------------------------------------------------------
# ownership: which command made a directory

OWNER_FILE = "made_by.json"


def owner(d):
    """The command that made directory d (named by its made_by.json), or None."""
    f = os.path.join(d, OWNER_FILE)
    if not os.path.isfile(f):
        return None
    try:
        return read_json(f).get("command")
    except (ValueError, AttributeError):
        return None


def check_owner(d, command, own_files):
    """Refuse, in one line, to continue, replace or delete in a directory that `command` did not
    make: one marked by another command, or one that holds files by this command's names
    (own_files) without a mark (made by hand, or by a version before the marks)."""
    made_by = owner(d)
    if made_by not in (None, command):
        raise ValueError(f"{d}: made by {made_by}, not {command}; choose another output directory")
    if made_by is None and own_files:
        raise ValueError(f"{d}: holds {sorted(own_files)[:3]}, which {command} did not make (no "
                         f"{OWNER_FILE}); choose another output directory")


_LOCKED = {}  # realpath -> open descriptor: the directories this process holds locked until exit


def lock_dir(d):
    """Hold an exclusive lock on directory d for the rest of this process, or refuse in one line
    when another process holds it: two runs writing into one output directory at once would
    leave the settings of one beside the results of the other. (Where the filesystem has no
    locks, such as some network mounts, there is none and nothing is said.)"""
    key = os.path.realpath(d)
    if key in _LOCKED:
        return
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{d}: another run is writing there now (it holds the directory's "
                         "lock); wait for it to end or choose another output") from None
    except OSError:  # no locks on this filesystem
        os.close(fd)
        return
    _LOCKED[key] = fd


def release_locks():
    """Let go of every directory lock this process holds (a command's end: user_errors)."""
    while _LOCKED:
        os.close(_LOCKED.popitem()[1])


def claim_dir(d, command, own_files=()):
    """Make d (new, or holding no file of this command's) command's own, or check that it is;
    and hold its lock (lock_dir) while this process runs."""
    os.makedirs(d, exist_ok=True)
    lock_dir(d)
    check_owner(d, command, own_files)
    if owner(d) is None:
        write_json(os.path.join(d, OWNER_FILE), dict(command=command))


def fresh_outputs(paths, overwrite, flag="--overwrite"):
    """Stop before writing when an output file exists, unless overwrite: one line naming it."""
    there = [p for p in paths if os.path.exists(p)]
    if there and not overwrite:
        raise ValueError(f"{there[0]}: exists; pass {flag} to replace it")


def start_run(out, run_file, settings, owns, overwrite, command, ignore=()):
    """The output directory of a resumable command: a new one gets run_file (the settings it is
    made from) and this command's mark; one that this command made and that holds its files
    (owns(name)) is continued when run_file matches, or with overwrite cleared of those files and
    nothing else. run_file also records the code (code_version), which a rerun does not compare,
    nor the recorded settings named in `ignore` (ones an earlier version recorded that do not
    change the outputs)."""
    os.makedirs(out, exist_ok=True)
    own = [n for n in os.listdir(out) if owns(n)]
    claim_dir(out, command, own)
    path = os.path.join(out, run_file)
    if own and overwrite:
        for n in own:
            os.remove(os.path.join(out, n))
    elif own:
        if not os.path.isfile(path):
            raise ValueError(f"{out}: holds this command's outputs without {run_file}; pass "
                             "--overwrite or choose another --out")
        recorded = read_json(path)
        for k in ("code", *ignore):
            recorded.pop(k, None)
        same_origin(recorded, settings, path)
        return
    write_json(path, {**settings, "code": code_version()})


def check_out(out, inputs, flag="--out"):
    """Refuse an output path that is, holds, or lies inside an input: inputs {what: path or None}.
    Writing there could replace or delete the input."""
    within = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)  # a is b or inside b
    o = os.path.realpath(out)
    for what, path in inputs.items():
        if not path:
            continue
        i = os.path.realpath(path)
        if within(o, i) or within(i, o):
            raise ValueError(f"{flag} {out}: is, holds or lies inside the input {what} {path}; "
                             f"choose another {flag}")


# -----------------------------------------------------------------------------
# what an artifact was made from


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_identity(path):
    """{path, sha256, bytes} of one file: enough to tell whether it changed."""
    return dict(path=os.path.abspath(path), sha256=sha256_file(path), bytes=os.path.getsize(path))


LATER_KEYS = {"weights_sample"}  # identity items that records of earlier versions lack


def differences(recorded, now, prefix=""):
    """The items on which two records of what something was made from differ, as lines
    "key: recorded ... vs now ...". Paths are left out: moving a file does not change it; so are
    LATER_KEYS that the record lacks (it was made before they were recorded)."""
    out = []
    for k in sorted(set(recorded) | set(now), key=str):
        if k == "path" or (k in LATER_KEYS and k not in recorded):
            continue
        a, b = recorded.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: recorded {a!r} vs now {b!r}")
    return out


def same_origin(recorded, now, what, flag="--overwrite"):
    """Raise one line naming what differs when an output was made from other inputs or settings
    than the command now has."""
    diff = differences(recorded, now)
    if diff:
        raise ValueError(f"{what} was made from other inputs or settings ({'; '.join(diff[:3])}"
                         f"{'; ...' if len(diff) > 3 else ''}); pass {flag} or choose another "
                         "output")


def code_version():
    """The code an artifact was made by: the sha256 of the scripts (*.py, csrc/), and the git
    commit when they are a checkout ("+changes" when the work tree differs from it)."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    files = glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "csrc", "*"))
    for f in sorted(files):
        with open(f, "rb") as fh:
            h.update(os.path.relpath(f, root).encode() + b"\0" + fh.read() + b"\0")
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,
                                    timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        if commit and git("status", "--porcelain", "--untracked-files=no").stdout.strip():
            commit += "+changes"
    except (OSError, subprocess.SubprocessError):  # no git here
        commit = None
    return dict(scripts_sha256=h.hexdigest(), commit=commit)


# -----------------------------------------------------------------------------
# torch.distributed


def setup_dist(device="auto"):
    """(rank, world, device). Under torchrun (RANK is set): one process group over all ranks, NCCL
    on GPUs, gloo on CPUs, each rank on its LOCAL_RANK GPU. A plain `python x.py` is a group of one
    (an in-memory store), so one code path serves every world size. Later calls reuse the group.
    device: as pick_device takes it; under torchrun a GPU is the rank's own (LOCAL_RANK)."""
    device = pick_device(device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if "RANK" in os.environ
                              else device.index or 0)
        if device.index >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {device.index}: this machine has "
                             f"{torch.cuda.device_count()} GPU(s); give torchrun "
                             "--nproc-per-node at most that many")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_dist():
    """End the process group. On a normal end every rank first meets the others, so that none
    tears its group down while another still talks to it (gloo then aborted a rank at exit, now
    and then); while an exception propagates there is no meeting (the others may never come)."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def print0(*a, **k):
    """print on rank 0 only (or when no process group runs)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


# -----------------------------------------------------------------------------
# statistics


def bootstrap_ci(stat, sizes, n=1000, seed=0, min_kept=1):
    """95% percentile bootstrap interval [lo, hi] of a statistic.

    sizes: the length of each sample (one for a mean, one shared by paired samples, two for a
    difference of independent samples). Each replicate draws, for each sample in turn, as many
    indices with replacement as it has items and calls stat(*index_lists); a replicate where stat
    returns None (undefined) is dropped. [None, None] when fewer than min_kept replicates remain.
    """
    rng = random.Random(seed)
    vals = []
    for _ in range(n):
        v = stat(*([rng.randrange(k) for _ in range(k)] for k in sizes))
        if v is not None:
            vals.append(v)
    if not vals or len(vals) < min_kept:
        return [None, None]
    return percentile_ci(sorted(vals))


def percentile_ci(replicates):
    """The 95% percentile interval [lo, hi] of sorted bootstrap replicates."""
    n = len(replicates)
    return [replicates[int(0.025 * n)], replicates[int(0.975 * n) - 1]]


# -----------------------------------------------------------------------------
# command lines


@contextmanager
def user_errors(script):
    """Bad input (a ValueError or a missing file, whose messages name the file and what is wrong)
    ends the command with that one line instead of a traceback; so does Ctrl-C (exit 130). The
    command's directory locks (lock_dir) are released at its end."""
    try:
        yield
    except KeyboardInterrupt:
        close_bars()
        print(f"{script}: interrupted (SIGINT); run the same command again to continue",
              file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError) as e:  # bad input, a full disk, a read-only or missing path
        close_bars()
        raise SystemExit(f"{script}: {e}") from None
    except (RuntimeError, AssertionError) as e:
        if "CUDA" not in str(e):
            raise
        close_bars()
        raise SystemExit(f"{script}: {e} (no such device here: check --device)") from None
    finally:
        release_locks()


def close_bars():
    """End the open progress bars, so that an error line starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def add_model_flags(p, adapter_required=False):
    """--model, --adapter, --tokenizer, --dtype: what load_model and the tokenizer need."""
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--adapter", required=adapter_required, help="PEFT adapter directory")
    p.add_argument("--other-base", action="store_true",
                   help="use an adapter trained on another base than --model")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --model)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")


def pick_device(name="auto"):
    """The device a command runs a model on: "auto" is the GPU where there is one, else the CPU;
    "cpu", "cuda" or "cuda:N" as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def free_memory(device):
    """Bytes free on a device now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        kb = dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]
    return int(kb) * 1024


def add_device_flag(p, what="where the model runs"):
    """--device, shared by every command that runs a model or an SAE outside torchrun."""
    p.add_argument("--device", default="auto", help=f"{what}: auto (default: cuda where there is "
                   "one, else cpu), cpu, cuda or cuda:N")


def field_comments(cls):
    """{field: its comment} from the dataclass's source: the text after `#` on the field's line and
    on the comment lines that follow it, so a config's comments are also its --help."""
    out, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if m and not line.lstrip().startswith("#"):
            name = m.group(1)
            out[name] = (m.group(2) or "").strip()
        elif name and line.lstrip().startswith("#"):
            out[name] = (out[name] + " " + line.split("#", 1)[1].strip()).strip()
        else:
            name = None
    return out


def add_config_flags(parser, cls, skip=(), choices=None, defaults=None):
    """One --dashed-flag per field of the dataclass `cls` (but those in skip), default None so
    that config_from_flags can tell what was given; booleans take --flag / --no-flag. Each flag's
    help is the field's comment and its default (the field's, or the command's own from
    `defaults`, which it must then pass to config_from_flags); choices: {field: allowed values}."""
    notes = field_comments(cls)
    for f in (f for f in fields(cls) if f.name not in skip):
        if not notes.get(f.name):  # its --help would only repeat its name
            raise TypeError(f"{cls.__name__}.{f.name}: no comment on its line to explain it (what "
                            "it does, its unit); every config field needs one for its --help")
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        text = notes[f.name] + f" (default: {default!r})"
        text = text.replace("%", "%%")  # argparse formats help with %
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        elif isinstance(f.default, (int, float)):
            kind = getattr(cls, "RANGES", {}).get(f.name, "any")
            parser.add_argument(flag, type=number(type(f.default), kind), default=None, help=text)
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=text,
                                choices=(choices or {}).get(f.name))


def config_flags(settings):
    """add_config_flags' inverse: {field: value} as the command-line flags that set them."""
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, v]
    return out


# the ranges a number given on the command line may take: (test, what it must be)
RANGES = {"any": (lambda v: True, ""), "positive": (lambda v: v > 0, " > 0"),
          "nonnegative": (lambda v: v >= 0, " >= 0"), "unit": (lambda v: 0 <= v <= 1, " in [0, 1]"),
          "below_one": (lambda v: 0 <= v < 1, " in [0, 1)"),
          "seed": (lambda v: 0 <= v < 2**32, " in [0, 2**32)")}
BIGGEST_INT = 2**62  # any count beyond this is a typo (and overflows torch's int64 arithmetic)


def check_number(v, kind="any"):
    """v when it is a finite number in RANGES[kind] (an int no larger than BIGGEST_INT), else a
    ValueError saying what it must be."""
    ok, want = RANGES[kind]
    too_big = isinstance(v, int) and abs(v) > BIGGEST_INT
    if isinstance(v, bool) or not math.isfinite(v) or too_big or not ok(v):
        raise ValueError(f"must be a finite number{want}"
                         f"{f' up to {BIGGEST_INT}' if too_big else ''}")
    return v


def number(cast, kind="any"):
    """An argparse type: a number of type cast (int, float) in RANGES[kind]; a bad value ends the
    command with one line naming the flag (see Parser)."""
    def parse(text):
        try:
            return check_number(cast(text), kind)
        except ValueError as e:
            msg = str(e) if str(e).startswith("must") else f"expected {cast.__name__}"
            raise argparse.ArgumentTypeError(f"{msg}, got {text!r}") from None
    parse.__name__ = cast.__name__
    parse.kind = kind
    return parse


def numbers(cast, kind="any"):
    """An argparse type: a comma-separated list of number(cast, kind)."""
    one = number(cast, kind)

    def parse(text):
        return [one(t) for t in text.split(",") if t.strip()] or one("")
    parse.__name__, parse.kind = f"list of {cast.__name__}", kind
    return parse


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends the command with one line (`prog: argument --x: ...`), not
    the usage text and the error on two."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def check_numbers(cfg):
    """One line naming the flag when a number of the config cfg is not finite or out of the range
    its class declares in RANGES ({field: kind}; unnamed numeric fields: "any")."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                check_number(v, getattr(type(cfg), "RANGES", {}).get(f.name, "any"))
            except ValueError as e:
                raise ValueError(f"--{f.name.replace('_', '-')} {e}, got {v}") from None


def config_from_flags(cls, ns, base=None):
    """cls(**base, overridden by every flag given in the argparse namespace ns)."""
    given = {f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name,
                                                                         None) is not None}
    return cls(**{**(base or {}), **given})
