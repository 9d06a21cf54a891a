"""
The data: the tokenizer, Qwen2.5's chat format, and the s1 format (the one home of its markers),
with the files they come from.

    from data import Tokenizer, render_chat, s1_example, s1_prompt
    tok = Tokenizer("/models/Qwen2.5-32B-Instruct")          # a directory with tokenizer.json
    ids, mask = s1_example(row, tok)                          # row: one s1K-1.1 record (a dict)
    prompt = tok.encode(s1_prompt("What is 2 + 2?"))          # what eval.py generates from

The chat format is Qwen2.5's ChatML, rendered in plain Python (no jinja): each turn is
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, and when the first message is not a system message
Qwen's default system prompt is inserted. Tool calls are not supported.

The s1 format (docs/paper.md sections B-D): the assistant turn is `<|im_start|>think\\n{trace}\\n
<|im_start|>answer\\n{attempt}`. Training sequences (s1_example) wrap it in the chat template;
generation (s1_prompt) stops after the think marker; when the thinking budget runs out, the answer
phase starts with FINAL_ANSWER; grading reads what follows the last ANSWER marker. The paper's
activation corpus used a variant without the chat template (paper_collection_text).
"""
import json
import os

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from common import file_identity

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ASSISTANT_HEADER = IM_START + "assistant\n"
# s1's markers ("think" and "answer" are plain text tokens after a special one)
THINK, ANSWER = IM_START + "think", IM_START + "answer"
FINAL_ANSWER = ANSWER + "\nFinal Answer:"  # the answer head after the thinking budget ran out (s1)
PAPER_SYSTEM = "You are a helpful mathematics assistant."  # the paper's activation corpus (D)

# s1K-1.1 fields the training sequence is built from
S1_FIELDS = ("question", "deepseek_thinking_trajectory", "deepseek_attempt")


class Tokenizer:
    """A `tokenizers` BPE tokenizer with the ChatML special tokens; no BOS (Qwen adds none)."""

    def __init__(self, path):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        self.path = file
        try:
            self.tk = HFTokenizer.from_file(file)
        except Exception as e:  # the tokenizers library's own error: a cut or foreign file
            raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
        for s in (IM_START, IM_END, ENDOFTEXT):
            if self.tk.token_to_id(s) is None:
                raise ValueError(f"{file}: the special token {s} is missing")
        self.im_start, self.im_end, self.eot = (self.tk.token_to_id(s)
                                                for s in (IM_START, IM_END, ENDOFTEXT))

    def check_fits(self, vocab_size, model):
        """One line when this tokenizer makes ids that a model of vocab_size rows cannot embed."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"{self.path}: {self.vocab_size:,} token ids, more than the "
                             f"{vocab_size:,} rows of {model}'s embedding (another model's "
                             "tokenizer?)")
        return self

    @property
    def vocab_size(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token_str(self, i):
        """The text one token stands for (byte-level pieces decoded); for display."""
        return self.tk.decode([i], skip_special_tokens=False)

    def token_id(self, s):
        i = self.tk.token_to_id(s)
        if i is None:
            raise KeyError(f"{self.path}: no token {s!r}")
        return i


def train_tokenizer(texts, out_dir, vocab_size, max_len):
    """Byte-level BPE with one token per digit (as Qwen2.5's tokenizer splits digits) and Qwen's
    special tokens, trained on `texts` (a tokenizer for a tiny world: demo.py, rehearse.py); written
    as out_dir/tokenizer.json and tokenizer_config.json."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tk.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(eos_token=IM_END, pad_token=ENDOFTEXT, bos_token=None,
                       model_max_length=max_len,
                       tokenizer_class="PreTrainedTokenizerFast"), f, indent=1)


def render_chat(messages, add_generation_prompt=False, system=DEFAULT_SYSTEM):
    """Qwen2.5's chat template for plain (tool-free) conversations, as a string."""
    out = []
    if not messages or messages[0]["role"] != "system":
        out.append(f"{IM_START}system\n{system}{IM_END}\n")
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"chat message role {m['role']!r} is not one of system/user/assistant")
        out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(ASSISTANT_HEADER)
    return "".join(out)


def s1_assistant(row):
    """The assistant turn of s1's training text: think marker, trace, answer marker, attempt.

    As in s1's data/tokenization.py: the trace is stripped (a list of traces is joined by newlines
    first) and the attempt gets an "Answer: " prefix unless it already contains "Answer:".
    """
    trace = row["deepseek_thinking_trajectory"]
    trace = "\n".join(trace) if isinstance(trace, list) else trace
    attempt = row["deepseek_attempt"]
    if "Answer:" not in attempt:
        attempt = "Answer: " + attempt
    return f"{THINK}\n{trace.strip()}\n{ANSWER}\n{attempt}"


def chat_prompt(question):
    """One user turn in the chat template, ending where the assistant's reply begins."""
    return render_chat([{"role": "user", "content": question}], add_generation_prompt=True)


def s1_prompt(question):
    """The s1 generation prompt: chat_prompt, then the think marker."""
    return chat_prompt(question) + THINK


def paper_collection_text(row):
    """The official code's activation corpus format (docs/paper.md section D): no chat template, no
    <|im_end|> between turns, its own system prompt, the trace and attempt as they are."""
    return (f"{IM_START}system\n{PAPER_SYSTEM}\n{IM_START}user\n{row['question']}\n"
            f"{ASSISTANT_HEADER}{THINK}\n{row['deepseek_thinking_trajectory']}\n"
            f"{ANSWER}\n{row['deepseek_attempt']}{IM_END}")


def s1_example(row, tok, source="row"):
    """One s1K-1.1 row -> (ids, mask): mask is 1 on every token after the `<|im_start|>assistant\\n`
    header (the thinking, the answer, the closing <|im_end|> and its trailing newline, exactly the
    tokens trl's DataCollatorForCompletionOnlyLM trains on in the official code) and 0 before it."""
    check_s1_row(row, source)
    prompt = chat_prompt(row["question"])
    text = render_chat([{"role": "user", "content": row["question"]},
                        {"role": "assistant", "content": s1_assistant(row)}])
    ids, head = tok.encode(text), tok.encode(prompt)
    # the header ends in a special token boundary, so the whole text tokenises to prompt + rest
    assert ids[:len(head)] == head, f"{source}: the prompt is not a token prefix of the text"
    return ids, [0] * len(head) + [1] * (len(ids) - len(head))


def check_s1_row(row, source="row"):
    if not isinstance(row, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(row).__name__}")
    for f in S1_FIELDS:
        v = row.get(f)
        if (f == "deepseek_thinking_trajectory" and isinstance(v, list)
                and all(isinstance(s, str) for s in v)):
            continue
        if not isinstance(v, str):
            got = type(v).__name__ if f in row else "nothing"
            raise ValueError(f"{source}: field {f!r} must be a string, got {got}")


def read_rows(path, required=()):
    """Rows of a .jsonl or .parquet file as dicts; errors name the file, the line and the field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                              "or convert the file to .jsonl") from None
        rows = pq.read_table(path).to_pylist()
        where = [f"{path} row {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path} line {n}: not UTF-8 text (byte {e.start + 1} of the "
                                     "line)") from None
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
                where.append(f"{path} line {n}")
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty)")
    for row, w in zip(rows, where):
        if not isinstance(row, dict):
            raise ValueError(f"{w}: expected a JSON object")
        for f in required:
            if f not in row:
                raise ValueError(f"{w}: missing field {f!r}")
        for k, v in row.items():  # JSON may escape a lone surrogate, which no tokenizer takes
            if isinstance(v, str) and not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"{w}: field {k!r} is not valid Unicode (a lone surrogate "
                                     f"at character {e.start + 1})") from None
    return rows, where


def data_identity(path, rows=None):
    """What a data file is: {path, sha256, bytes, rows} (rows: its count, when already read)."""
    return dict(file_identity(path), rows=len(read_rows(path)[0]) if rows is None else rows)


MAX_CHARS_PER_TOKEN = 64  # beyond this many characters per token of the block a row is refused
MAX_DOCUMENT_CHARS = 2**24  # a pretraining document longer than this (16.8M characters) too


def load_s1(path, tok, block_size=None):
    """An s1K-1.1 file -> (examples, stats). Each example is (inputs, targets): next-token pairs of
    the s1 sequence, targets -100 where the loss mask is 0. Sequences longer than block_size are
    truncated, and counted: stats says how many, and how many trained-on tokens were cut (the
    official code dropped them silently), as are rows whose thinking trace is empty."""
    rows, where = read_rows(path)
    examples, truncated, lost, empty = [], 0, 0, 0
    for row, w in zip(rows, where):
        chars = sum(len(v) if isinstance(v, str) else sum(map(len, v)) for k, v in row.items()
                    if k in S1_FIELDS and isinstance(v, (str, list)))
        if block_size and chars > MAX_CHARS_PER_TOKEN * block_size:  # before tokenizing it whole
            raise ValueError(f"{w}: {chars:,} characters, more than {MAX_CHARS_PER_TOKEN} x "
                             f"--block-size {block_size} can hold (the run would keep its first "
                             f"{block_size} tokens); cut the row or raise --block-size")
        ids, mask = s1_example(row, tok, source=w)
        trace = row["deepseek_thinking_trajectory"]
        empty += not "".join(trace if isinstance(trace, list) else [trace]).strip()
        if block_size and len(ids) > block_size:
            truncated += 1
            lost += sum(mask[block_size:])
            ids, mask = ids[:block_size], mask[:block_size]
        targets = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        examples.append((ids[:-1], targets))
    stats = dict(rows=len(rows), truncated=truncated, target_tokens_lost=lost,
                 empty_thinking=empty, tokens=sum(len(i) for i, _ in examples),
                 target_tokens=sum(sum(t != -100 for t in ts) for _, ts in examples))
    return examples, stats


def load_text(path, tok, block_size):
    """A pretraining corpus (rows with a "text" field) -> (examples, stats) in load_s1's shape: the
    documents, each followed by <|endoftext|>, are concatenated and cut into blocks of block_size
    next-token pairs, every token trained on (the tail shorter than a block is dropped, and
    counted)."""
    rows, where = read_rows(path, required=("text",))
    for row, w in zip(rows, where):
        if not isinstance(row["text"], str):
            raise ValueError(f"{w}: field 'text' must be a string")
        if len(row["text"]) > MAX_DOCUMENT_CHARS:  # tokenized whole it could exhaust the memory
            raise ValueError(f"{w}: a document of {len(row['text']):,} characters, more than "
                             f"{MAX_DOCUMENT_CHARS:,}; split it into documents")
    stream = []
    for ids in tok.encode_batch([row["text"] for row in rows]):
        stream += ids + [tok.eot]
    n = (len(stream) - 1) // block_size
    if n == 0:
        raise ValueError(f"{path}: {len(stream)} tokens do not fill one block of {block_size}")
    examples = [(stream[i * block_size:(i + 1) * block_size],
                 stream[i * block_size + 1:(i + 1) * block_size + 1])
                for i in range(n)]
    stats = dict(rows=n, documents=len(rows), truncated=0,
                 target_tokens_lost=len(stream) - 1 - n * block_size,
                 tokens=n * block_size, target_tokens=n * block_size)
    return examples, stats


def load_examples(path, tok, block_size):
    """load_text for a corpus of {"text"} rows, load_s1 otherwise (decided by the first row)."""
    rows, _ = read_rows(path)
    if rows and "text" in rows[0] and "question" not in rows[0]:
        return load_text(path, tok, block_size)
    return load_s1(path, tok, block_size)
