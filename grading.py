"""
Local, deterministic answer grading for AIME / MATH500 / GPQA (no LLM judge). eval.py re-exports
`grade` and `extract_answer`.

    grade("math500", "... so the answer is $\\boxed{\\frac{1}{2}}$.", "0.5")   # True

Extraction follows the s1 harness: text after the last `<|im_start|>answer` marker, then the
content of the last \\boxed{...} / \\boxed x / \\fbox{...} (braces matched), else the last
`Answer:` line. MATH equivalence: both sides are normalised (LaTeX spacing, \\left/\\right,
\\dfrac/\\tfrac, degrees, \\text{} and units, thousands separators, trailing zeros, `x =` prefixes),
compared as strings, then component-wise for tuples / intervals (order and bracket types matter),
then numerically or, for expressions in a few single-letter variables, by evaluating both at
random points with a small parser written here (never Python's eval).
"""
import math
import random
import re

# -----------------------------------------------------------------------------
# extraction


def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces), \\boxed x or \\fbox{...}; None if none."""
    best, best_pos = None, -1
    for cmd in ("\\boxed", "\\fbox"):
        pos = text.rfind(cmd)
        while pos != -1:
            rest = text[pos + len(cmd):]
            if rest.startswith("{"):
                depth = 0
                for i, ch in enumerate(rest):
                    depth += ch == "{"
                    depth -= ch == "}"
                    if depth == 0:
                        if pos > best_pos:
                            best, best_pos = rest[1:i], pos
                        break
                else:  # unbalanced: try an earlier occurrence
                    pos = text.rfind(cmd, 0, pos)
                    continue
                break
            if rest.startswith(" ") and cmd == "\\boxed":  # "\boxed 5"
                m = re.match(r" +([^\s$]+)", rest)
                if m and pos > best_pos:
                    best, best_pos = m.group(1), pos
                break
            pos = text.rfind(cmd, 0, pos)
    return best


def extract_answer(generation):
    """The final answer in a model output, or None when there is none."""
    text = generation
    for marker in ("<|im_start|>answer", "<|im_start|>"):
        i = text.rfind(marker)
        if i != -1:
            text = text[i + len(marker):]
            break
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = list(re.finditer(r"(?i)answer\s*:\s*(.*)", text))
    if m:
        ans = m[-1].group(1).strip().rstrip(".").strip()
        ans = re.sub(r"^\$+|\$+$", "", ans).strip()
        return ans or None
    return None


# -----------------------------------------------------------------------------
# normalisation

UNITS = ["square units", "sq units", "units", "unit", "inches", "inch", "feet", "foot", "ft",
         "meters", "meter", "cm", "mm", "km", "m", "miles", "mile", "mph", "hours", "hour",
         "minutes", "minute", "seconds", "second", "days", "day", "degrees", "degree", "dollars",
         "dollar", "cents", "cent", "pounds", "cups", "people", "students", "ways", "points",
         "years", "inches^2", "cm^2", "m^2", "ft^2"]


def _strip_text_commands(s):
    # \text{...}, \textbf{...}, \mathrm{...}, \mbox{...} -> their content
    prev = None
    while prev != s:
        prev = s
        s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}",
                   r"\1", s)
    return s


def normalize(s):
    """Canonical string form of a MATH-style answer."""
    s = s.strip()
    s = s.replace("\n", " ")
    for spacing in ("\\!", "\\,", "\\;", "\\:"):
        s = s.replace(spacing, "")
    s = re.sub(r"(?<!\\)\\ ", " ", s).replace("~", " ")  # "\ " is a space, "\\ " a matrix row break
    s = s.replace("\\left", "").replace("\\right", "").replace("\\bigl", "").replace("\\bigr", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "").replace("\\circ", "")
    s = _strip_text_commands(s)
    s = s.strip()
    # units: a trailing unit word (possibly squared), only after something that is not a letter
    for u in sorted(UNITS, key=len, reverse=True):
        s2 = re.sub(r"(?<=[\d}\s)])\s*" + re.escape(u) + r"(\^\{?2\}?)?\s*$", "", s)
        if s2 != s and s2.strip():
            s = s2.strip()
            break
    s = s.replace("{,}", ",")
    # thousands separators: 10,080 / 11,111,111,100 (not tuples like 1,-2 or 3, 5, 7)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s.replace(" ", "")):
        s = s.replace(",", "").replace(" ", "")
    # "x = 5", "x \in [-2,7]" -> the right-hand side, when the left is one variable
    m = re.fullmatch(r"\s*[a-zA-Z]\s*(=|\\in)\s*(.+)", s)
    if m and "=" not in m.group(2):
        s = m.group(2)
    s = s.replace(" ", "")
    s = s.rstrip(".")
    # \frac12, \frac 59, \frac9{19}, \sqrt2 -> braced forms
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    # numbers: trailing zeros, leading dot, leading plus
    s = re.sub(r"(?<![\d.])(\d+)\.(\d*?)0+(?![\d])",
               lambda m: m.group(1) + ("." + m.group(2) if m.group(2) else ""), s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    s = re.sub(r"^\+", "", s)
    return s


# -----------------------------------------------------------------------------
# a small parser for numeric / symbolic comparison


class _Parser:
    """Recursive descent over normalised LaTeX-ish math: + - * / ^, implicit products, \\frac,
    \\sqrt, \\pi, \\cdot, \\times, parentheses and braces, single-letter variables."""

    # known commands match as prefixes, since spaces are gone by now ("\\cdot y" became "\\cdoty")
    TOKEN = re.compile(r"\d+\.?\d*|\.\d+|\\(?:frac|sqrt|pi|cdot|times)|\\[a-zA-Z]+|[a-zA-Z]"
                       r"|[-+*/^(){}\[\]]|_\{?\d+\}?")

    def __init__(self, s):
        pos, self.toks = 0, []
        for m in self.TOKEN.finditer(s):
            if s[pos:m.start()].strip():
                raise ValueError(f"unexpected {s[pos:m.start()]!r}")
            self.toks.append(m.group())
            pos = m.end()
        if s[pos:].strip():
            raise ValueError(f"unexpected {s[pos:]!r}")
        self.i = 0
        self.vars = set()

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected=None):
        t = self.peek()
        if t is None or (expected is not None and t != expected):
            raise ValueError(f"expected {expected!r}, got {t!r}")
        self.i += 1
        return t

    def parse(self):
        e = self.expr()
        if self.peek() is not None:
            raise ValueError(f"trailing {self.peek()!r}")
        return e

    def expr(self):
        e = self.term()
        while self.peek() in ("+", "-"):
            op, r = self.take(), self.term()
            e = ("+", e, r) if op == "+" else ("-", e, r)
        return e

    def starts_atom(self, t):
        return t is not None and (t[0].isdigit() or t[0] == "."
                                  or t in ("(", "{", "\\pi", "\\sqrt", "\\frac")
                                  or (len(t) == 1 and t.isalpha()))

    def term(self):
        e = self.unary()
        while True:
            t = self.peek()
            if t in ("*", "\\cdot", "\\times", "/"):
                self.take()
                r = self.unary()
                e = ("/", e, r) if t == "/" else ("*", e, r)
            elif self.starts_atom(t):
                e = ("*", e, self.power())
            else:
                return e

    def unary(self):
        if self.peek() == "-":
            self.take()
            return ("neg", self.unary())
        if self.peek() == "+":
            self.take()
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() == "^":
            self.take()
            return ("^", base, self.unary() if self.peek() != "{" else self.atom())
        return base

    def group(self):
        self.take("{")
        e = self.expr()
        self.take("}")
        return e

    def atom(self):
        t = self.take()
        if t[0].isdigit() or t[0] == ".":
            return ("num", float(t))
        if t == "\\pi":
            return ("num", math.pi)
        if t == "\\frac":
            return ("/", self.group(), self.group())
        if t == "\\sqrt":
            return ("sqrt", self.group() if self.peek() == "{" else self.atom())
        if t in ("(", "{"):
            e = self.expr()
            self.take(")" if t == "(" else "}")
            return e
        if len(t) == 1 and t.isalpha():
            self.vars.add(t)
            return ("var", t)
        raise ValueError(f"unsupported {t!r}")


def _eval(e, env):
    op = e[0]
    if op == "num":
        return e[1]
    if op == "var":
        return env[e[1]]
    if op == "neg":
        return -_eval(e[1], env)
    if op == "sqrt":
        return math.sqrt(_eval(e[1], env))
    a, b = _eval(e[1], env), _eval(e[2], env)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    if abs(b) > 64 or abs(a) > 1e6:
        raise OverflowError
    return a ** b


def _close(a, b):
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def _mixed_number(s):
    # "1\frac{4}{5}" / "137\frac{1}{2}" is a mixed number, 1 + 4/5
    m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        v = int(m.group(2)) + int(m.group(3)) / int(m.group(4))
        return -v if m.group(1) else v
    return None


def _value_equal(a, b):
    """Numeric or symbolic equality of two normalised, bracket-free strings."""
    try:
        pa, pb = _Parser(a), _Parser(b)
        ea, eb = pa.parse(), pb.parse()
    except (ValueError, IndexError):
        return False
    va, vb = sorted(pa.vars | pb.vars), None
    if len(va) > 3 or re.search(r"[a-zA-Z]{3}", re.sub(r"\\[a-zA-Z]+", "", a + b)):
        return False  # words, not algebra
    if pa.vars != pb.vars:
        return False
    rng = random.Random(0)
    for _ in range(5):
        env = {v: rng.uniform(0.5, 2.5) for v in va}
        try:
            x, y = _eval(ea, env), _eval(eb, env)
        except (ZeroDivisionError, ValueError, OverflowError):
            return False
        if not _close(x, y):
            return False
        vb = True
    return bool(vb)


def _split_top(s):
    """Split on commas not inside (), [], {}."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _equal_norm(a, b):
    if a == b:
        return True
    ma, mb = _mixed_number(a), _mixed_number(b)
    if ma is not None or mb is not None:
        try:
            va = ma if ma is not None else _eval(_Parser(a).parse(), {})
            vb = mb if mb is not None else _eval(_Parser(b).parse(), {})
            return _close(va, vb)
        except (ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError):
            return False
    # tuples / intervals / lists: same brackets, same length, equal components in order
    if "," in a or "," in b:
        pa, pb = a, b
        brackets = lambda x: (x[0], x[-1]) if x and x[0] in "([{" and x[-1] in ")]}" else ("", "")
        if brackets(pa) != brackets(pb):
            return False
        if brackets(pa) != ("", ""):
            pa, pb = pa[1:-1], pb[1:-1]
        xa, xb = _split_top(pa), _split_top(pb)
        return len(xa) == len(xb) and len(xa) > 1 and all(_equal_norm(x, y) for x, y in zip(xa, xb))
    if "\\cup" in a or "\\cup" in b:
        xa, xb = a.split("\\cup"), b.split("\\cup")
        return len(xa) == len(xb) and all(_equal_norm(x, y) for x, y in zip(xa, xb))
    if a.count("=") == 1 and b.count("=") == 1:
        (la, ra), (lb, rb) = a.split("="), b.split("=")
        return _equal_norm(la, lb) and _equal_norm(ra, rb)
    if any(c in a + b for c in "[]") or "\\begin" in a + b or "\\pm" in a + b:
        return False
    return _value_equal(a, b)


def math_equal(pred, gold):
    """MATH-style equivalence of two answer strings."""
    if pred is None:
        return False
    return _equal_norm(normalize(pred), normalize(gold))


# -----------------------------------------------------------------------------
# per benchmark

# "math": any other problem/answer set (jsonl or parquet), graded like MATH500
BENCHMARKS = ("aime24", "aime25", "math500", "gpqa", "math")


def extract_letter(generation):
    """The chosen option A-D: the extracted answer if it is a letter (also "(B)", "\\text{C}",
    "Option D", "b"), else an explicit phrase like "the answer is C"; None when nothing is found."""
    ans = extract_answer(generation)
    if ans is not None:
        a = normalize(ans).strip("(){}[]. ")
        m = re.fullmatch(r"(?i)(?:option|choice)?\s*\(?([a-d])\)?(?:[).:].*)?", a)
        if m:
            return m.group(1).upper()
    m = list(re.finditer(r"(?i)(?:answer|choice|option)\s*(?:is|:)?\s*\(?\b([A-D])\b\)?",
                         generation))
    return m[-1].group(1).upper() if m else None


def grade(benchmark, generation, gold):
    """True when the final answer in `generation` is correct for `gold`."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {list(BENCHMARKS)}")
    if benchmark == "gpqa":
        return extract_letter(generation) == str(gold).strip().upper()
    pred = extract_answer(generation)
    if pred is None:
        return False
    if benchmark in ("aime24", "aime25"):
        p, g = normalize(pred), normalize(str(gold))
        if re.fullmatch(r"-?\d+", p) and re.fullmatch(r"-?\d+", g):
            return int(p) == int(g)
        return math_equal(pred, str(gold))
    return math_equal(pred, str(gold))
