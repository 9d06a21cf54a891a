"""
Autointerp: LLM explanations of features from their examples (features.json, interpret.py mine),
scored by detection, and the paper's 0/1/2 monosemanticity rubric. interpret.py autointerp runs it;
llm.py talks to the server.

    rows = autointerp(features, llm=None)            # the explanation prompts only
    rows = autointerp(features, LLM(url, model, cache_dir), rubric=True)

Explanation: the top examples sorted by activation (the official code forgot to sort, docs/paper.md
G2) and a few random non-zero ones, each a snippet with the firing token marked <<like this>>.
Detection (the official code had no score): the explanation must pick, among held-out positives
and as many inactive snippets, those where the feature fires; balanced accuracy.
compare_populations sets LoRA features against MLP neurons on both scores.
"""
import json
import random
import re

from common import bootstrap_ci
from llm import LLMError
from lora import MLP, parse_site_label

EXPLAIN_SYSTEM = ("You study a feature of a language model that reads reasoning traces. You are "
                  "shown text snippets where it fires, strongest first; the token it fires on is "
                  "marked <<like this>> with its activation. Answer with one short sentence: what "
                  "the feature responds to.")
DETECT_SYSTEM = ("You are given an explanation of a feature and numbered text snippets. The "
                 "feature fires on the token marked <<like this>> in some of them. Answer with a "
                 "JSON list of the numbers of the snippets where you think it fires, and nothing "
                 "else.")
# docs/paper.md F2's three classes, in our words; the reply is JSON, validated (else no score)
RUBRIC_SYSTEM = ("Classify this feature from its explanation and its top examples. 0: one "
                 "specific, clear meaning that every example fits. 1: a broad or noisy meaning, "
                 "but every example still fits. "
                 "2: polysemantic, some examples do not fit any single meaning. Reply with JSON "
                 '{"classification": 0, 1 or 2, "classification_reasoning": "one sentence"}.')
# the official single call (docs/paper.md F2, in our words): explanation and class in one reply
OFFICIAL_SYSTEM = ("You analyse the activations of one neuron of a language model and answer in "
                   "JSON only.")
OFFICIAL_TASK = ("Each example below is a text window, then the tokens where the neuron is most "
                 "active, each with its activation on a 0-10 scale. Explain what the neuron looks "
                 "for in at most 10 words, not a full sentence; say so if it always fires on one "
                 "token. Then classify it. 0: one specific, clear meaning that every example "
                 "fits. 1: a broad or noisy meaning, but every example still fits. 2: "
                 "polysemantic, some examples do not fit any single meaning. Reply with JSON "
                 '{"explanation": "...", "classification": 0, 1 or 2, '
                 '"classification_reasoning": "one sentence"}.')
# docs/paper.md A/F4: the 7 top-level categories of SAE features, with subcategories (the official
# hierarchical list was not published: the ids it names are kept, the rest are ours)
CATEGORIES = {
    "symbolic_manipulation": ["latex_commands", "math_operators", "equation_structure"],
    "variable_value_tracking": ["variable_names", "numeric_values", "indexed_variables"],
    "computational_operations": ["arithmetic_ops", "algebraic_steps", "counting"],
    "reasoning_flow_control": ["hesitation_markers", "transitions", "step_organization",
                               "verification"],
    "domain_specific_patterns": ["physics_notation", "chemistry_notation", "geometry",
                                 "abstract_algebra"],
    "relational_logical_operators": ["comparisons", "logical_connectives", "conditionals"],
    "result_formulation": ["final_answer", "conclusions", "summaries"],
}
CATEGORISE_SYSTEM = ("You sort features of a language model that reads reasoning traces into a "
                     "fixed list of categories. Given a feature's explanation and examples, reply "
                     'with JSON {"category": ..., "subcategory": ...} using names from this list '
                     "exactly:\n" + json.dumps(CATEGORIES))


def stand_in_reply(messages):
    """A deterministic stand-in for the LLM, answering each of this file's prompts in its format
    (rehearse.py serves it, so that the commands run end to end without a real judge): one
    explanation for every feature, the first snippet detected, rubric class 1, the first
    category. Its answers say nothing about the features."""
    system = messages[0]["content"]
    if system == DETECT_SYSTEM:
        return "[1]"
    if system == RUBRIC_SYSTEM:
        return json.dumps({"classification": 1, "classification_reasoning": "a stand-in"})
    if system == OFFICIAL_SYSTEM:
        return json.dumps({"explanation": "a stand-in (no LLM was asked)", "classification": 1,
                           "classification_reasoning": "a stand-in"})
    if system == CATEGORISE_SYSTEM:
        cat, subs = next(iter(CATEGORIES.items()))
        return json.dumps({"category": cat, "subcategory": subs[0]})
    return "A stand-in explanation (no LLM was asked)."


def snippet(e, window=12):
    lo, t = max(0, e["target"] - window), e["target"]
    toks = e["tokens"]
    return "".join(toks[lo:t]) + "<<" + toks[t] + ">>" + "".join(toks[t + 1:t + 1 + window])


def explain_messages(f, n=10):
    """The explanation prompt: the top examples sorted by activation (the official code forgot to
    sort, docs/paper.md G2), then a few random non-zero ones."""
    top = sorted(f["top"], key=lambda e: -e["value"])[:n]
    lines = [f"{i + 1}. ({e['value']:.3g}) {snippet(e)}" for i, e in enumerate(top)]
    lines += [f"r{i + 1}. ({e['value']:.3g}) {snippet(e)}" for i, e in enumerate(f["random"][:3])]
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "\n".join(lines)}]


def rubric_messages(f, explanation, n=10):
    """The rubric rates the feature's own explanation against its top examples only, as the
    official prompt does (2.2_autointerp_lora.py): no random weak examples."""
    top = sorted(f["top"], key=lambda e: -e["value"])[:n]
    lines = [f"{i + 1}. ({e['value']:.3g}) {snippet(e)}" for i, e in enumerate(top)]
    return [{"role": "system", "content": RUBRIC_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nTop examples:\n"
                                        + "\n".join(lines)}]


def official_messages(f, n=10, seed=0, window=8, max_tokens=10):
    """The official single-call prompt's content (docs/paper.md F2): n top examples (sorted, where
    the official code took its stored order, G2; shuffled with a seed, where it shuffled unseeded),
    each a window of +-8 tokens around its firing token (joined without spaces, "..." where cut),
    then up to 10 lines "token value" for its tokens whose activation is above half the largest
    |activation| among all the examples, on a 0-10 scale of that largest value."""
    top = sorted(f["top"], key=lambda e: -e["value"])[:n]
    random.Random(seed + f["id"]).shuffle(top)
    peak = max((abs(a) for e in top for a in e["acts"]), default=0.0) or 1.0
    blocks = []
    for i, e in enumerate(top):
        lo, hi = max(0, e["target"] - window), min(len(e["tokens"]), e["target"] + window + 1)
        text = (("..." if lo > 0 else "") + "".join(e["tokens"][lo:hi])
                + ("..." if hi < len(e["tokens"]) else ""))
        strong = [(t, a) for t, a in zip(e["tokens"][lo:hi], e["acts"][lo:hi])
                  if abs(a) / peak > 0.5][:max_tokens]
        blocks.append(f"Example {i + 1}: {text}\n" + "\n".join(
            f"{t} {min(10, round(10 * abs(a) / peak))}" for t, a in strong))
    return [{"role": "system", "content": OFFICIAL_SYSTEM},
            {"role": "user", "content": OFFICIAL_TASK + "\n\n" + "\n\n".join(blocks)}]


def detection_set(f, n_explain=10, n=6, seed=0):
    """Held-out positives (top examples not shown to the explainer, then random non-zero ones) and
    as many inactive snippets, shuffled with a seed: [(snippet, fires)]."""
    pos = sorted(f["top"], key=lambda e: -e["value"])[n_explain:] + f["random"]
    pos, neg = pos[:n], f.get("inactive", [])[:n]
    items = [(snippet(e), True) for e in pos] + [(snippet(e), False) for e in neg]
    random.Random(seed + f["id"]).shuffle(items)
    return items


def detect_messages(explanation, items):
    body = "\n".join(f"{i + 1}. {s}" for i, (s, _) in enumerate(items))
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\n{body}"}]


def balanced_accuracy(items, chosen):
    pos = [i for i, (_, y) in enumerate(items) if y]
    neg = [i for i, (_, y) in enumerate(items) if not y]
    tpr = sum(i in chosen for i in pos) / len(pos) if pos else 0.0
    tnr = sum(i not in chosen for i in neg) / len(neg) if neg else 0.0
    return (tpr + tnr) / 2 if pos and neg else (tpr if pos else tnr)


def autointerp(features, llm=None, rubric=False, n_explain=10, mode="ours"):
    """Explanation prompts for every feature with examples; with an LLM: explanations, detection
    balanced accuracy on held-out positives and inactive snippets, optionally the 0/1/2 rubric.
    mode "ours": the explanation, then the rubric in a second call; "official": both from one
    call, the official prompt's content (official_messages; rubric implied)."""
    if mode not in ("ours", "official"):
        raise ValueError(f"--rubric-mode {mode!r}: expected ours or official")
    feats = [f for f in features if f["top"]]
    prompt = official_messages if mode == "official" else explain_messages
    rows = [dict(id=f["id"], name=f["name"], top_value=max(e["value"] for e in f["top"]),
                 rubric_mode=mode, messages=prompt(f, n_explain)) for f in feats]
    if llm is None:
        return rows

    def one(pair):
        f, row = pair
        try:
            reply = llm(row["messages"]).strip()
            if mode == "official":
                obj = json_object(reply) or {}
                row["rubric"], row["rubric_reasoning"] = parse_rubric(reply)
                if not isinstance(obj.get("explanation"), str) or not obj["explanation"].strip():
                    raise LLMError(f"no explanation in the reply {reply[:80]!r}")
                reply = obj["explanation"].strip()
            row["explanation"] = reply
            items = detection_set(f, n_explain)
            answer = llm(detect_messages(row["explanation"], items))
            chosen = parse_choice(answer)
            row["detection_balanced_accuracy"] = (None if chosen is None
                                                  else balanced_accuracy(items, chosen))
            row["detection_items"] = len(items)
            if rubric and mode == "ours":
                reply = llm(rubric_messages(f, row["explanation"], n_explain))
                row["rubric"], row["rubric_reasoning"] = parse_rubric(reply)
        except LLMError as e:  # one feature's failure leaves the others' results standing
            row["error"] = f"feature {f['id']} ({f['name']}): {e}"
        return row
    return llm.map(one, list(zip(feats, rows)))


def parse_choice(answer):
    """The snippet indices (0-based) in a judge's reply "[2, 5]", or None when it holds no list of
    numbers (an unparseable reply is no score, not a score of nothing chosen)."""
    try:
        return {int(i) - 1 for i in json.loads(answer[answer.index("["):answer.rindex("]") + 1])}
    except (ValueError, TypeError):
        return None


def json_object(reply):
    """The first {...} in a reply as a dict, or None."""
    try:
        obj = json.loads(reply[reply.index("{"):reply.rindex("}") + 1])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_rubric(reply):
    """(0, 1 or 2, reasoning) from a rubric reply; (None, None) when it is not one (the paper's -1,
    excluded from the counts)."""
    obj = json_object(reply) or {}
    c = obj.get("classification")
    if isinstance(c, str) and c.strip() in ("0", "1", "2"):
        c = int(c)
    if type(c) is not int or c not in (0, 1, 2):
        return None, None
    return c, obj.get("classification_reasoning")


def parse_category(reply):
    """(category, subcategory) from a categoriser reply, validated against CATEGORIES; raises
    ValueError naming what is wrong (the caller records the feature as uncategorised)."""
    obj = json_object(reply)
    if obj is None:
        raise ValueError(f"no JSON object in the reply {reply[:80]!r}")
    cat, sub = obj.get("category"), obj.get("subcategory")
    if cat not in CATEGORIES:
        raise ValueError(f"unknown category {cat!r}; expected one of {list(CATEGORIES)}")
    if sub not in CATEGORIES[cat]:
        raise ValueError(f"unknown subcategory {sub!r} of {cat}; expected one of "
                         f"{CATEGORIES[cat]}")
    return cat, sub


def categorise(features, explanations, llm, n=5):
    """The categoriser (docs/paper.md F4): each explained feature with its top n examples -> rows
    {id, name, category, subcategory}, or an error for a reply that names no listed
    (sub)category."""
    by_id = {f["id"]: f for f in features}

    def one(row):
        f = by_id[row["id"]]
        lines = [f"{i + 1}. {snippet(e)}" for i, e in
                 enumerate(sorted(f["top"], key=lambda e: -e["value"])[:n])]
        msg = [{"role": "system", "content": CATEGORISE_SYSTEM},
               {"role": "user", "content": f"Explanation: {row['explanation']}\n\n"
                + "\n".join(lines)}]
        out = dict(id=row["id"], name=row["name"])
        try:
            out["category"], out["subcategory"] = parse_category(llm(msg))
        except (LLMError, ValueError) as e:
            out["error"] = f"feature {row['id']} ({row['name']}): {e}"
        return out
    return llm.map(one, [r for r in explanations if r.get("explanation") and r["id"] in by_id])


# the 0/1/2 rubric's classes, and feature names: L{layer}.{target}{+-} (an adapter's polarity),
# N{layer}.{index}{+-} (an MLP neuron's), sae{i} (an SAE latent)
CLASSES = (0, 1, 2)
NEURON = re.compile(r"N(\d+)\.(\d+)")


def parse_name(name):
    """(layer, kind, polarity) of `L{l}.{target}{+-}` (an adapter) or `N{l}.{i}{+-}` (a neuron, kind
    = its index); None for SAE latents."""
    body, sign = name[:-1], name[-1:]
    if sign not in ("+", "-"):
        return None
    m = NEURON.fullmatch(body)
    if m:
        return int(m[1]), int(m[2]), sign
    try:
        return (*parse_site_label(body), sign)
    except ValueError:
        return None


def paper_rows(lora_rows, mlp_rows):
    """The paper's populations (2.6_analyze_mlp_interpretability.py): the MLP-adapter features
    (gate, up, down; both polarities), and each MLP neuron in its dominant polarity (the larger
    top activation, chosen before rating: a failed rating drops the neuron)."""
    lora = [r for r in lora_rows if parse_name(r["name"]) and parse_name(r["name"])[1] in MLP]
    best = {}
    for r in (r for r in mlp_rows if parse_name(r["name"])):
        if "top_value" not in r:
            raise ValueError(f"feature {r['name']}: no top_value (autointerp.jsonl from an older "
                             "version); rerun interpret.py autointerp, or --populations all")
        key = parse_name(r["name"])[:2]
        if key not in best or r["top_value"] > best[key]["top_value"]:
            best[key] = r
    return lora, list(best.values())


def populations(lora_rows, mlp_rows, which="paper"):
    """The two rated populations: (LoRA rows, MLP rows), each row with a rubric class: the
    paper's (paper_rows), or all: every rated row of both files (SAE latents and all 7 adapter
    types, both polarities of the neurons)."""
    rated = lambda rows: [r for r in rows if r.get("rubric") in CLASSES]
    lora, mlp = paper_rows(lora_rows, mlp_rows) if which == "paper" else (lora_rows, mlp_rows)
    return rated(lora), rated(mlp)


def compare_populations(lora_rows, mlp_rows, n=1000, seed=0, which="paper"):
    """LoRA features vs MLP neurons, in the populations `which` picks (see populations): mean
    detection balanced accuracy and (when rated) the 0/1/2 rubric shares, each with a bootstrap
    95% interval, and the difference of the means."""
    if which == "paper":
        lora_rows, mlp_rows = paper_rows(lora_rows, mlp_rows)
    mean = lambda xs, idx: sum(xs[i] for i in idx) / len(idx)
    table = {}
    for key in ("detection_balanced_accuracy", "rubric"):
        a = [r[key] for r in lora_rows if r.get(key) is not None]
        b = [r[key] for r in mlp_rows if r.get(key) is not None]
        if not a or not b:
            continue
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        row = dict(lora=ma, lora_ci95=bootstrap_ci(lambda i: mean(a, i), [len(a)], n, seed),
                   mlp=mb, mlp_ci95=bootstrap_ci(lambda i: mean(b, i), [len(b)], n, seed),
                   n_lora=len(a), n_mlp=len(b), diff=ma - mb,
                   diff_ci95=bootstrap_ci(lambda i, j: mean(a, i) - mean(b, j), [len(a), len(b)],
                                          n, seed))
        if key == "rubric":
            row["shares"] = {p: {c: sum(x == c for x in xs) / len(xs) for c in (0, 1, 2)}
                             for p, xs in (("lora", a), ("mlp", b))}
        table[key] = row
    return table
