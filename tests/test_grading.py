"""The local grader: extraction, AIME integers, MATH equivalence (hand-written pairs), GPQA
letters."""
import json
import os

import pytest

from conftest import SHARED_DATA, needs_shared
from eval import extract_answer, grade
from grading import extract_letter, math_equal

# --- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("nested \\boxed{\\left(3, \\frac{\\pi}{2}\\right)} end", "\\left(3, \\frac{\\pi}{2}\\right)"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("deep \\boxed{a_{b_{c}} + {d}}", "a_{b_{c}} + {d}"),
    ("\\boxed 5 is it", "5"),
    ("\\fbox{42}", "42"),
    ("no box here", None),
    ("The work...\nAnswer: 17", "17"),
    ("Answer: 3\nmore text\nanswer: $12$.", "12"),
    ("<|im_start|>think\nmaybe \\boxed{4}\n<|im_start|>answer\nAnswer: 5", "5"),
    ("<|im_start|>think\n\\boxed{4}\n<|im_start|>answer\nFinal Answer: \\boxed{7}", "7"),
    ("unbalanced \\boxed{3 and \\boxed{4}", "4"),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_aime_integer_normalisation():
    assert grade("aime24", "\\boxed{25}", "025")
    assert grade("aime25", "Answer: 025", "25")
    assert grade("aime24", "\\boxed{0}", "000")
    assert not grade("aime24", "\\boxed{26}", "025")
    assert not grade("aime24", "no answer", "025")
    assert grade("aime24", "\\boxed{\\text{25}}", "025")


# --- MATH equivalence: (prediction, gold, expected verdict) -------------------------------------
EQUAL = [
    # fractions, decimals, mixed numbers
    ("0.5", "\\frac{1}{2}"), ("\\frac12", "0.5"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac{3}{4}", "0.75"),
    ("\\frac 34", "\\frac{3}{4}"), ("\\frac9{19}", "\\frac{9}{19}"), ("\\frac43", "\\frac{4}{3}"),
    ("4/3", "\\frac{4}{3}"),
    ("1\\frac{4}{5}", "1.8"), ("137\\frac{1}{2}", "137.5"),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}"),
    ("0.34", "\\dfrac{17}{50}"), (".0000672", "0.0000672"), (".35625", "0.35625"),
    ("-\\frac{3}{8}", "-0.375"),
    ("\\frac{-3}{8}", "-\\frac{3}{8}"), ("\\frac{6}{4}", "\\frac{3}{2}"), ("1.5", "\\frac{3}{2}"),
    # trailing zeros, signs, plain integers
    ("5.00", "5"), ("0.50", "0.5"), ("1.250", "1.25"), ("+7", "7"), ("3.0", "3"), ("10", "10"),
    ("-4", "-4"),
    ("326.50", "326.5"), ("4.5", "4.50"), ("007", "7"),
    # LaTeX spacing and sizing
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("3\\,\\sqrt{13}", "3\\sqrt{13}"),
    ("10,\\!080", "10080"), ("11,\\! 111,\\! 111,\\! 100", "11111111100"), ("\\!5", "5"),
    ("2\\;\\pi", "2\\pi"),
    ("x^{2} + 1", "x^2+1"), ("3 \\sqrt{5}", "3\\sqrt{5}"), ("\\left[1,2\\right]", "[1,2]"),
    # degrees
    ("90", "90^\\circ"), ("90^{\\circ}", "90"), ("145°", "145^\\circ"), ("30^\\circ", "30"),
    ("\\frac{\\pi}{6}", "\\frac{\\pi}{6}"),
    # text and units
    ("\\text{Evelyn}", "Evelyn"), ("east", "\\text{east}"), ("\\textbf{even}", "\\text{even}"),
    ("(C)", "\\text{(C)}"),
    ("5.4", "5.4 \\text{ cents}"), ("864", "864 \\mbox{ inches}^2"), ("15", "15\\mbox{ cm}^2"),
    ("12 \\text{ cm}", "12"),
    ("20 dollars", "20"), ("7 units", "7"), ("3 \\text{ feet}", "3"), ("45 \\text{degrees}", "45"),
    ("\\mathrm{ellipse}", "\\text{ellipse}"),
    # currency, percent, thousands
    ("\\$18.90", "18.9"), ("18.90", "\\$18.90"), ("\\$32,\\!348", "32348"), ("58,500", "58500"),
    ("\\$36", "36"),
    ("50\\%", "50"), ("25%", "25"), ("1{,}000", "1000"), ("1,000,000", "1000000"), ("\\$ 5", "5"),
    # "x =" prefixes and equations
    ("x=5", "5"), ("x = 5", "5"), ("5", "x=5"), ("x \\in [-2,7]", "[-2,7]"),
    ("y = 2x + 3", "y=2x+3"),
    ("5x - 7y + 11z + 4 = 0", "5x-7y+11z+4=0"), ("y = -2x", "y=-2x"),
    # roots and pi forms
    ("11\\sqrt2", "11\\sqrt{2}"), ("\\sqrt{2} \\cdot 11", "11\\sqrt{2}"),
    ("\\sqrt{51}", "\\sqrt{51}"), ("\\pi/2", "\\frac{\\pi}{2}"),
    ("2\\pi", "2 \\pi"), ("288\\pi", "288 \\pi"), ("\\frac{20000}{\\pi}", "20000/\\pi"),
    ("18 + 2\\pi", "2\\pi+18"),
    ("\\frac{3\\sqrt{3}}{4}", "\\frac{3}{4}\\sqrt{3}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"), ("-\\sqrt{3}", "-\\sqrt 3"),
    ("2\\sqrt{5}", "\\sqrt{20}"), ("\\sqrt{8}", "2\\sqrt{2}"), ("7\\pi", "7 \\pi"),
    ("\\pi^2/8", "\\frac{\\pi^2}{8}"),
    # expressions with variables (evaluated at random points)
    ("x^2+7x+10", "x^2 + 7x + 10"), ("7x+x^2+10", "x^2+7x+10"), ("(x+2)(x+5)", "x^2+7x+10"),
    ("p - q", "-q+p"),
    ("2k+2", "2(k+1)"), ("6r^2-4r-24", "2(3r^2-2r-12)"), ("15x - 80", "-80+15x"),
    ("5r^5", "5 r^5"), ("3R^2", "3R^{2}"),
    ("x^3+3x-6", "3x+x^3-6"), ("(a+5)(b+2)", "ab+2a+5b+10"),
    ("\\frac{11+9a}{20}", "\\frac{11}{20}+\\frac{9a}{20}"),
    ("-13x+3", "3-13x"), ("8n^2 + 4n + 1", "8n^2+4n+1"), ("2 k", "2k"), ("x \\cdot y", "xy"),
    ("a/b", "\\frac{a}{b}"),
    # complex numbers (i as a variable)
    ("6 - 5i", "6-5i"), ("-5i+6", "6-5i"), ("1+2i", "2i+1"), ("-2 + 7i", "7i-2"),
    # tuples and intervals, in order
    ("(3, 4]", "(3,4]"), ("(-\\infty, 0]", "(-\\infty,0]"), ("(2,\\infty)", "(2, \\infty)"),
    ("(6,31,-1)", "(6, 31, -1)"),
    ("(0.5, -13)", "\\left( \\frac{3}{2}-1, -13 \\right)"), ("(-2,1)", "(-2, 1)"),
    ("1,-2", "1, -2"), ("3, 5, 7", "3,5,7"),
    ("(0,9) \\cup (9,36)", "(0,9)\\cup(9,36)"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)"),
    ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(0.6, \\frac{8}{3}]"),
    ("(1,-16,-4,43)", "(1, -16, -4, 43)"),
    # matrices and bases (string forms)
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix}-1/3\\\\2/3\\\\5/3\\end{pmatrix}"),
    ("52_8", "52_8"), ("4210_{5}", "4210_{5}"), ("1 \\pm \\sqrt{19}", "1\\pm\\sqrt{19}"),
    ("\\cot x", "\\cot x"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{1\\pm\\sqrt{5},-2\\}"),
]
UNEQUAL = [
    ("0.5", "\\frac{1}{3}"), ("\\frac{1}{2}", "\\frac{2}{1}"), ("5", "50"), ("5.1", "5"),
    ("-4", "4"), ("1.8", "1\\frac{4}{6}"),
    ("(3,4)", "(3,4]"), ("[3,4]", "(3,4)"), ("(1,2)", "(2,1)"), ("2,-1", "-1,2"),
    ("(1,2,3)", "(1,2)"), ("3, 5, 7", "3, 7, 5"),
    ("Eveyln", "Evelyn"), ("\\text{west}", "\\text{east}"), ("odd", "even"), ("(B)", "(C)"),
    ("x^2+7x+11", "x^2+7x+10"), ("2k+1", "2k+2"), ("p + q", "p - q"), ("6+5i", "6-5i"),
    ("x^2", "y^2"),
    ("2\\pi", "\\pi"), ("\\sqrt{3}", "\\sqrt{2}"), ("\\frac{\\pi}{3}", "\\frac{\\pi}{6}"),
    ("90", "45^\\circ"),
    ("y = 2x + 4", "y = 2x + 3"), ("x=6", "5"), ("1000", "100"), ("10,080", "1008"),
    ("18.91", "\\$18.90"),
    ("(0,9) \\cup (9,35)", "(0,9)\\cup(9,36)"), ("1 + \\sqrt{19}", "1 \\pm \\sqrt{19}"), ("", "5"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    ("52_8", "52_9"),
]


@pytest.mark.parametrize("pred,gold", EQUAL)
def test_math_equal(pred, gold):
    assert math_equal(pred, gold)
    assert grade("math500", f"The answer is $\\boxed{{{pred}}}$.", gold)


@pytest.mark.parametrize("pred,gold", UNEQUAL)
def test_math_unequal(pred, gold):
    assert not math_equal(pred, gold)


def test_enough_hand_written_pairs():
    assert len(EQUAL) + len(UNEQUAL) >= 150


@needs_shared
def test_all_math500_golds_grade_as_correct():
    rows = [json.loads(l) for l in open(os.path.join(SHARED_DATA, "math500", "test.jsonl"))]
    assert len(rows) == 500
    for r in rows:
        g = r["answer"]
        assert math_equal(g, g), g
        assert grade("math500", f"Therefore the final answer is $\\boxed{{{g}}}$. Done.", g), g


# --- GPQA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,letter", [
    ("\\boxed{B}", "B"), ("\\boxed{(C)}", "C"), ("\\boxed{\\text{D}}", "D"), ("Answer: a", "A"),
    ("Answer: (B)", "B"),
    ("The answer is C.", "C"), ("So the correct option is (D)", "D"), ("\\boxed{C) 42 kJ}", "C"),
    ("answer: B.", "B"),
    ("I pick choice A", "A"), ("nothing to see", None), ("\\boxed{42}", None),
])
def test_gpqa_letter_extraction(text, letter):
    assert extract_letter(text) == letter
    assert grade("gpqa", text, "B") == (letter == "B")


def test_gpqa_no_default_to_a():
    assert not grade("gpqa", "I cannot decide", "A")


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        grade("mmlu", "x", "y")
