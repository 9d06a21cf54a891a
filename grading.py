"""
Local, deterministic answer grading for AIME / MATH500 / GPQA (no LLM judge); grade_sample grades
a generation and never raises.

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
import operator
import random
import re
from fractions import Fraction

from data import ANSWER, IM_START

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


def answer_part(generation):
    """What follows the last answer marker (s1's answer phase), or the last <|im_start|>; the
    whole output when it has neither (the plain protocol)."""
    for marker in (ANSWER, IM_START):
        i = generation.rfind(marker)
        if i != -1:
            return generation[i + len(marker):]
    return generation


def extract_answer(generation):
    """The final answer in a model output, or None when there is none."""
    text = answer_part(generation)
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
    # (a decimal written to 6 or more places keeps them: it stands for what rounds to it)
    s = re.sub(r"(?<![\d.])(\d+)\.(\d*?)0+(?![\d])",
               lambda m: m.group(0) if len(m.group(0)) - len(m.group(1)) > 6
               else m.group(1) + ("." + m.group(2) if m.group(2) else ""), s)
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
            return ("num", Fraction(t))
        if t == "\\pi":
            return ("pi",)
        if t == "\\frac":
            return ("/", self.group(), self.group())
        if t == "\\sqrt":
            if self.peek() == "[":  # \sqrt[n]{x} = x^(1/n)
                self.take("[")
                n = self.expr()
                self.take("]")
                return ("^", self.group() if self.peek() == "{" else self.atom(),
                        ("/", ("num", Fraction(1)), n))
            return ("sqrt", self.group() if self.peek() == "{" else self.atom())
        if t in ("(", "{"):
            e = self.expr()
            self.take(")" if t == "(" else "}")
            return e
        if len(t) == 1 and t.isalpha():
            self.vars.add(t)
            return ("var", t)
        raise ValueError(f"unsupported {t!r}")


ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _eval(e, env):
    """Float value of a parsed expression, variables from env."""
    op = e[0]
    if op == "num":
        return float(e[1])
    if op == "var":
        return env[e[1]]
    if op == "neg":
        return -_eval(e[1], env)
    if op == "sqrt":
        return math.sqrt(_eval(e[1], env))
    if op == "pi":
        return math.pi
    a, b = _eval(e[1], env), _eval(e[2], env)
    if op in ARITH:
        return ARITH[op](a, b)
    if abs(b) > 64 or abs(a) > 1e6:
        raise OverflowError
    return a ** b


def _exact(e):
    """The exact rational value of a parsed expression (integers, decimals, + - * /, integer
    powers), or None when it holds a radical, pi or a variable."""
    op = e[0]
    if op == "num":
        return e[1]
    if op in ("var", "sqrt", "pi"):
        return None
    if op == "neg":
        v = _exact(e[1])
        return None if v is None else -v
    a, b = _exact(e[1]), _exact(e[2])
    if a is None or b is None:
        return None
    if op in ARITH:
        return ARITH[op](a, b)
    if b.denominator != 1 or abs(b) > 4096 or (a == 0 and b < 0):  # 2^{65} stays exact
        return None
    return a ** int(b)


def _decimal_places(s):
    """d for a number written as a decimal with d >= 6 fractional digits (then it stands for any
    value that rounds to it, as math-verify's rounding to 6 places has it), else None."""
    m = re.fullmatch(r"-?\d*\.(\d{6,})", s)
    return len(m.group(1)) if m else None


def _mixed_number(s):
    # "1\frac{4}{5}" / "137\frac{1}{2}" is a mixed number, 1 + 4/5
    m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        v = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return -v if m.group(1) else v
    return None


def _value_equal(a, b):
    """Numeric or symbolic equality of two normalised, bracket-free strings. Rationals (integers,
    fractions, decimals, integer powers) are compared exactly; values with radicals or pi, and
    expressions in a few variables (at random points), to floating-point rounding (1e-9); a
    decimal written to 6 or more places matches any value that rounds to it."""
    try:
        pa, pb = _Parser(a), _Parser(b)
        ea, eb = pa.parse(), pb.parse()
    except (ValueError, IndexError, ZeroDivisionError):
        return False
    if len(pa.vars | pb.vars) > 3 or re.search(r"[a-zA-Z]{3}", re.sub(r"\\[a-zA-Z]+", "", a + b)):
        return False  # words, not algebra
    if pa.vars != pb.vars:
        return False
    places = _decimal_places(a) or _decimal_places(b)
    if not pa.vars:
        try:
            xa, xb = _exact(ea), _exact(eb)
            if xa is not None and xb is not None and not places:
                return xa == xb
            fa, fb = _eval(ea, {}), _eval(eb, {})
        except (ZeroDivisionError, ValueError, OverflowError):
            return False
        if places:
            return abs(fa - fb) <= 0.5 * 10 ** -places * (1 + 1e-9)
        return _close(fa, fb)
    rng = random.Random(0)
    for _ in range(5):
        env = {v: rng.uniform(0.5, 2.5) for v in sorted(pa.vars)}
        try:
            if not _close(_eval(ea, env), _eval(eb, env)):
                return False
        except (ZeroDivisionError, ValueError, OverflowError):
            return False
    return True


def _close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


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


def _pm(s):
    """The values `x \\pm y` stands for, as a list (one \\pm), else None."""
    if s.count("\\pm") != 1:
        return None
    left, right = s.split("\\pm")
    return [left + "+" + right, left + "-" + right] if left else ["+" + right, "-" + right]


def _same_items(xa, xb):
    """Two lists equal as multisets (each item matched once, by _equal_norm)."""
    if len(xa) != len(xb):
        return False
    left = list(xb)
    for x in xa:
        k = next((i for i, y in enumerate(left) if _equal_norm(x, y)), None)
        if k is None:
            return False
        left.pop(k)
    return True


def _equal_norm(a, b):
    if a == b:
        return True
    ma, mb = _mixed_number(a), _mixed_number(b)
    if ma is not None or mb is not None:
        try:
            va = ma if ma is not None else _exact(_Parser(a).parse())
            vb = mb if mb is not None else _exact(_Parser(b).parse())
            return va is not None and vb is not None and va == vb
        except (ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError):
            return False
    # words ("\\text{Neither}" and "neither"): case does not matter
    if re.fullmatch(r"[A-Za-z]{2,}", a) and re.fullmatch(r"[A-Za-z]{2,}", b):
        return a.lower() == b.lower()
    if "\\cup" in a or "\\cup" in b:  # a union is a set of intervals: order-free
        return _same_items(a.split("\\cup"), b.split("\\cup"))
    # a set \\{...\\} or a bare list "3, 5, 7" is order-free, and x \\pm y stands for its two
    # values (as math-verify reads them); tuples and intervals keep order and bracket types
    unset = lambda x: x[2:-2] if x.startswith("\\{") and x.endswith("\\}") else x
    pa, pb = unset(a), unset(b)
    if "," in pa + pb or "\\pm" in pa + pb:
        brackets = lambda x: (x[0], x[-1]) if x and x[0] in "([{" and x[-1] in ")]}" else ("", "")
        if brackets(pa) != brackets(pb):
            return False
        if brackets(pa) != ("", ""):
            xa, xb = _split_top(pa[1:-1]), _split_top(pb[1:-1])
            return len(xa) == len(xb) > 1 and all(_equal_norm(x, y) for x, y in zip(xa, xb))
        values = lambda x: [v for item in _split_top(x) for v in (_pm(item) or [item])]
        xa, xb = values(pa), values(pb)
        return len(xa) > 1 and _same_items(xa, xb)
    if a.count("=") == 1 and b.count("=") == 1:
        (la, ra), (lb, rb) = a.split("="), b.split("=")
        return _equal_norm(la, lb) and _equal_norm(ra, rb)
    if any(c in a + b for c in "[]") and "\\sqrt[" not in a + b or "\\begin" in a + b:
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


# a GPQA answer in one of its canonical forms: "C", "(C)", "C)", "C.", "C) 7", "(C) 7",
# "Option C", "Choice (C)"; markdown bold, $ and \\text{} around it are removed first
LETTER = re.compile(r"([A-D])|\(([A-D])\)(?:\s.*)?|([A-D])[).:](?:\s.*)?"
                    r"|(?:Option|Choice)\s+\(?([A-D])\)?[.)]?", re.DOTALL)


# a letter stated in prose: "the answer is (C)", "the correct option is D", "Answer: The correct
# choice is B", "answer is **C**"; the letter must stand alone (not the article in "A lot")
PROSE_LETTER = re.compile(
    r"(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be|must\s+be))?\s*:?\s*"
    r"(?:(?i:the\s+)?(?i:correct\s+|best\s+|right\s+)?(?i:answer|option|choice)\s*"
    r"(?:(?i:is)\s*)?:?\s*)?[*_$(\[{\\text]*\s*([A-D])(?=$|[\s*$)\]}]*(?:$|[).,:;!?\n]))")
# a letter chosen in other words: "I'd go with C", "We pick B", "B is the correct choice", "A is
# correct", "C fits best", "Option B it is", "the answer here is B", "the answer to be C",
# "Therefore, B."; a letter stands alone, and a negated choice ("I would not choose D", "B is not
# correct") or a comparison ("pick between A and B") names none
_X = r"\(?\**([A-D])\**\)?"  # the letter, maybe in parentheses or bold
_END = r"(?=\s*(?:$|[.!;,:)]|\s(?:as|because|since|it|here|now)\b))"
CHOICE_LETTER = re.compile(
    r"(?i:\b(?:pick|picks|picking|choose|chooses|choosing|select|selects|selecting|go\s+with|"
    r"going\s+with|opt\s+for|settle\s+on|say|leaves|leaving)\s+(?:(?:option|choice|answer)\s+)?)"
    + _X + _END
    + r"|(?<![\w(])(?:(?i:option|choice)\s+)?" + _X
    + r"\s+(?i:is\s+(?:the\s+)?(?:correct|right|best|most\s+likely)\b|fits\s+best\b|it\s+is\b)"
    + r"|(?i:\b(?:answer|option|choice)(?:\s+\w+){1,2}?\s+(?:is|would\s+be|should\s+be|"
    r"must\s+be)|\b(?:answer|option|choice)\s+to\s+be)\s+" + _X + _END
    + r"|(?i:\b(?:thus|therefore|hence|so),?\s+(?:(?:option|choice)\s+)?)" + _X
    + r"(?=\s*[.!]?\s*$)")
NEGATED = re.compile(r"(?i)\b(?:not|never|n't|cannot|no)\b[^.!?\n]{0,20}$")
# an option named on a line of its own or in bold: "**B) 7 m/s**", "B) 7 m/s", "**C**"
LINE_LETTER = re.compile(r"(?m)^[\s>*_]*\(?([A-D])\)(?:\s|$)"
                         r"|\*\*\(?([A-D])\)?[).:]?(?:\s[^*\n]*)?\*\*")


def options(question):
    """{letter: option text} from a GPQA question's "A) ..." lines."""
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"(?m)^([A-D])\) (.*)$", question or "")}


def _squash(s):
    return re.sub(r"[\s$*_{}\\]+", " ", s).strip().lower()


def extract_letter(generation, question=None):
    """The chosen option A-D, from the answer phase only (never the thinking). First the s1
    harness's forms: the last \\boxed{} there, else what follows its last "Answer:" / "Final
    Answer:" in a canonical form (LETTER), or a bare lowercase letter (as s1's harness takes it).
    s1's harness hands any other answer to an LLM that reads the chosen letter off the prose;
    here, deterministically: the last letter stated in prose ("the answer is (C)", "the correct
    option is D"), else the last option on a line of its own or in bold ("**B) 7 m/s**"), else,
    given the question, the one option whose text the answer restates. None otherwise:
    unparseable, and wrong (the official harness defaulted it to "A")."""
    text = answer_part(generation)
    cand = last_boxed(text)
    if cand is None:
        m = list(re.finditer(r"(?i)answer\s*(?::|\s[-\u2013\u2014])\s*([^\n]*)", text))
        cand = m[-1].group(1) if m else None
    if cand is not None:
        cand = _strip_text_commands(cand.strip().strip("$*").strip())
        if cand in ("a", "b", "c", "d"):
            return cand.upper()
        m = LETTER.fullmatch(cand)
        if m:
            return next(g for g in m.groups() if g)
    if re.fullmatch(r"\s*\(?([A-D])\)?[.!]?\s*", text):  # the whole answer is a letter: "B."
        return text.strip()[0] if text.strip()[0] in "ABCD" else text.strip()[1]
    stated = sorted((m.start(), next(g for g in m.groups() if g))
                    for p in (PROSE_LETTER, CHOICE_LETTER) for m in p.finditer(text)
                    if not NEGATED.search(text[:m.start()]))
    if stated:
        return stated[-1][1]
    found = [next(g for g in m.groups() if g) for m in LINE_LETTER.finditer(text)]
    if found:
        return found[-1]
    said = _squash(text)
    named = [k for k, v in options(question).items() if len(_squash(v)) >= 2
             and re.search(r"(?<![\w.])" + re.escape(_squash(v)) + r"(?![\w])", said)]
    return named[0] if len(named) == 1 else None


def grade(benchmark, generation, gold, question=None):
    """True when the final answer in `generation` is correct for `gold` (GPQA: `question` lets an
    answer that restates one option's text count as that option)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {list(BENCHMARKS)}")
    if benchmark == "gpqa":
        return extract_letter(generation, question) == str(gold).strip().upper()
    pred = extract_answer(generation)
    if pred is None:
        return False
    if benchmark in ("aime24", "aime25"):
        p, g = normalize(pred), normalize(str(gold))
        if re.fullmatch(r"-?\d+", p) and re.fullmatch(r"-?\d+", g):
            return int(p) == int(g)
        return math_equal(pred, str(gold))
    return math_equal(pred, str(gold))


def grade_sample(bench, generation, gold, question=None):
    """(extracted answer, correct, error). Grading never raises: an answer the grader fails on is
    ungradeable, counted as wrong and reported with its id (results.json). GPQA's question lets
    an answer that restates one option's text count as that option."""
    try:
        pred = (extract_letter(generation, question) if bench == "gpqa"
                else extract_answer(generation))
        return pred, grade(bench, generation, gold, question), None
    except Exception as e:  # e.g. RecursionError on a degenerate answer: never lose the run
        return None, False, f"{type(e).__name__}: {str(e)[:200]}"
