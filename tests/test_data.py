"""Tokenizer, chat format and the s1 training sequence."""
import json
import os

import pytest

from helpers import QWEN_TOK, needs_shared, tiny_tokenizer
from data import DEFAULT_SYSTEM, Tokenizer, read_rows, render_chat, s1_assistant, s1_example

ROW = {"question": "What is 12*3?",
       "deepseek_thinking_trajectory": "  12*3 = 36.\nCheck: 36/3 = 12.  ",
       "deepseek_attempt": "The product is $\\boxed{36}$."}


@needs_shared
def test_qwen_tokenization_cases():
    tok = Tokenizer(QWEN_TOK)
    cases = [json.loads(l) for l in open(os.path.join(QWEN_TOK, "tokenization_cases.jsonl"))]
    assert len(cases) >= 43  # the README says 43; the file holds 44
    for c in cases:
        assert tok.encode(c["text"]) == c["ids"], c["text"]
        assert tok.decode(tok.encode(c["text"])) == c["text"]
    assert tok.encode("Hello world<|im_end|>") == [9707, 1879, 151645]
    assert (tok.eot, tok.im_start, tok.im_end, tok.token_id("<|fim_pad|>")) == (151643, 151644,
                                                                                151645, 151662)
    assert tok.vocab_size == 151665


def test_chat_rendering_matches_qwen_template():
    q = "What is $1+1$?"
    assert render_chat([{"role": "user", "content": q}], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n"
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}]
    assert render_chat(msgs) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                                 "<|im_start|>assistant\nA<|im_end|>\n")
    with pytest.raises(ValueError, match="role 'tool'"):
        render_chat([{"role": "tool", "content": "x"}])


@needs_shared
def test_chat_rendering_matches_hf_jinja_template():
    transformers = pytest.importorskip("transformers")
    ht = transformers.AutoTokenizer.from_pretrained(QWEN_TOK)
    for msgs in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]):
        for gen in (False, True):
            assert render_chat(msgs, gen) == ht.apply_chat_template(msgs, tokenize=False,
                                                                    add_generation_prompt=gen)


def test_s1_assistant_text():
    assert s1_assistant(ROW) == ("<|im_start|>think\n12*3 = 36.\nCheck: 36/3 = "
                                 "12.\n<|im_start|>answer\n"
                                 "Answer: The product is $\\boxed{36}$.")
    assert s1_assistant({**ROW, "deepseek_attempt": "Answer: 36"}).endswith("answer\nAnswer: 36")
    assert "think\na\nb\n" in s1_assistant({**ROW, "deepseek_thinking_trajectory": ["a", "b"]})


@needs_shared
def test_s1_sequence_and_mask_token_by_token():
    tok = Tokenizer(QWEN_TOK)
    ids, mask = s1_example(ROW, tok)
    # expected tokens, written out by hand from the Qwen2.5 vocabulary
    S, E, NL = 151644, 151645, 198
    system = [S, 8948, NL] + tok.encode(DEFAULT_SYSTEM) + [E, NL]
    user = [S, 872, NL] + tok.encode("What is 12*3?") + [E, NL]
    header = [S, 77091, NL]  # <|im_start|> assistant \n
    body = ([S, 26865, NL] + tok.encode("12*3 = 36.\nCheck: 36/3 = 12.\n") + [S, 9217, NL]
            + tok.encode("Answer: The product is $\\boxed{36}$.") + [E, NL])
    assert ids == system + user + header + body
    assert mask == [0] * len(system + user + header) + [1] * len(body)
    assert tok.decode([i for i, m in zip(ids, mask) if m]).startswith("<|im_start|>think\n12*3")
    assert (tok.id_to_token_str(8948), tok.id_to_token_str(26865),
            tok.id_to_token_str(9217)) == ("system", "think", "answer")


def test_s1_mask_with_a_tiny_tokenizer(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    ids, mask = s1_example(ROW, tok)
    first = mask.index(1)
    header = [tok.im_start] + tok.encode("assistant\n")
    assert ids[first - len(header):first] == header
    assert ids[first] == tok.im_start and ids[-2:] == [tok.im_end] + tok.encode("\n")
    assert all(mask[first:]) and not any(mask[:first])
    assert tok.decode(ids) == render_chat([{"role": "user", "content": ROW["question"]},
                                           {"role": "assistant", "content": s1_assistant(ROW)}])


def test_s1_row_errors(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    msg = "row 3: field 'deepseek_thinking_trajectory' must be a string, got nothing"
    with pytest.raises(ValueError, match=msg):
        s1_example({"question": "q", "deepseek_attempt": "a"}, tok, source="row 3")
    with pytest.raises(ValueError, match="field 'question' must be a string, got int"):
        s1_example({**ROW, "question": 5}, tok)


def test_read_rows_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(ROW) + "\n\n" + "{oops\n")
    with pytest.raises(ValueError, match=r"d.jsonl line 3: not valid JSON"):
        read_rows(str(f))
    f.write_text(json.dumps(ROW) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl line 2: missing field 'deepseek_attempt'"):
        read_rows(str(f), required=("question", "deepseek_attempt"))
    rows, where = read_rows(str(f))
    assert len(rows) == 2 and where[1].endswith("line 2")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_rows(str(tmp_path / "nope.jsonl"))


def test_load_text_packs_documents_with_endoftext(tmp_path):
    from data import load_examples, load_text
    tok = tiny_tokenizer(tmp_path)
    docs = ["What is 12*3?", "The product is 36.", "Check answer"]
    f = tmp_path / "corpus.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream = [t for d in docs for t in tok.encode(d) + [tok.eot]]
    examples, stats = load_text(str(f), tok, 4)
    n = (len(stream) - 1) // 4
    assert examples == [(stream[4 * i:4 * i + 4], stream[4 * i + 1:4 * i + 5]) for i in range(n)]
    assert stats["rows"] == n and stats["target_tokens_lost"] == len(stream) - 1 - 4 * n
    assert load_examples(str(f), tok,
                         4)[0] == examples  # {"text"} rows are a corpus, s1 rows are not
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl line 2: missing field 'text'"):
        load_text(str(f), tok, 4)


def test_block_size_truncates_the_sequence_and_counts_what_is_lost(tmp_path):
    """A sequence longer than --block-size keeps its first block_size tokens (block_size - 1
    next-token pairs, as HF's truncation then shift); what is cut is counted, not dropped silently.
    A sequence of exactly block_size tokens is kept whole."""
    from data import load_s1
    tok = tiny_tokenizer(tmp_path)
    row = dict(ROW, deepseek_thinking_trajectory=ROW["deepseek_thinking_trajectory"] * 4)
    ids, mask = s1_example(row, tok)
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(row) + "\n")
    block = len(ids) - 7
    [(inputs, targets)], stats = load_s1(str(f), tok, block)
    assert inputs == ids[:block - 1]
    assert targets == [t if m else -100 for t, m in zip(ids[1:block], mask[1:block])]
    assert stats["truncated"] == 1 and stats["target_tokens_lost"] == sum(mask[block:]) == 7
    [(inputs, _)], stats = load_s1(str(f), tok, len(ids))
    assert inputs == ids[:-1] and stats["truncated"] == 0
