"""Long-context evaluation: synthetic retrieval generated here, and loaders for three benchmarks.

Synthetic tasks (deterministic from a seed; no data files needed):

* ``lines`` — LongEval's "lines" retrieval (spec §8): N lines ``line <word>-<word>: REGISTER_CONTENT
  is <number>`` (distinct keys, distinct numbers in 1..50000), then a question for one line's number.
  Scored correct when the *first integer* in the model's answer equals that line's number.
* ``kv`` — Lost-in-the-Middle's key-value retrieval: a JSON object of N random UUID keys -> UUID
  values and a question for one key's value. Scored correct when the gold value occurs in the answer
  (case-insensitive substring, Lost-in-the-Middle's best-subspan exact match for a single answer).

The gold item sits at a chosen *position*: ``start`` (index 0), ``middle`` (index (N-1)//2), ``end``
(index N-1) or a fraction p in [0, 1] (index round(p·(N-1))). A length is either a number of items
(``--lines 300``) or a token budget (``--tokens 4000``): the largest N whose prompt fits the budget.
An example is *skipped* (and listed in the result) when prompt + ``max_new_tokens`` exceeds the
model's context (``config.max_position_embeddings``), never silently truncated.

Decoding: greedy ``model.generate`` on one prompt at a time, at most ``max_new_tokens`` new tokens,
stopping at EOS. Instruct models (a tokenizer with a chat template) get the prompt as one user
message with the generation prompt appended (``chat="auto"``); base models get the raw text.

Benchmark loaders (local files only; every one raises ConfigError naming the file and the fix when
data is absent or malformed) return :class:`LongExample` lists that :func:`run_examples` scores:

* :func:`load_leval` — an L-Eval task file (e.g. ``LEval-data/Closed-ended-tasks/tpo.jsonl``), one
  JSON object per line: ``input`` (the long document, str), ``instructions`` (list[str], questions),
  ``outputs`` (list[str], gold answers, same length); optional ``source``, ``evaluation``. One example
  per (document, question). Metric ``leval_exam``: option-letter answers (``A``, ``(B)``, ``ACD``)
  must match the set of standalone letters A–E in the first line of the output; other answers must
  occur in the output (normalized: lower case, punctuation and extra spaces removed).
* :func:`load_longiclbench` — LongICLBench-style extreme-label in-context learning from two jsonl
  files of ``{"text": str, "label": str}`` (integer labels are mapped through ``label_names``):
  ``rounds`` rounds of demonstrations from the train file (each round one example per label, in
  first-seen label order) then one test query. Metric ``label``: the first output line, stripped,
  equals the gold label.
* :func:`load_lca_library` — Long Code Arena library-based code generation jsonl: ``instruction``
  (str), ``clean_reference`` or ``reference`` (str, gold code), ``unique_apis`` (list[str]); optional
  ``repo_full_name``, ``context`` (retrieved project code, prepended). Metric ``api_recall``: the
  fraction of ``unique_apis`` whose last name component occurs as an identifier in the output (an
  approximation of LCA's parser-based API recall).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from rsq.errors import ConfigError
from rsq.generation import decode_kwargs
from rsq.models.device import resolve_device

log = logging.getLogger(__name__)

TASKS = ("lines", "kv")
POSITIONS = {"start": 0.0, "middle": 0.5, "end": 1.0}
DEFAULT_NEW_TOKENS = {"lines": 24, "kv": 48}

_ADJ = (
    "amber azure bold brave brisk calm clever cosmic crisp curious dapper eager fancy fierce gentle "
    "golden happy hidden humble icy jolly keen lively lucky mellow misty noble odd polite proud quick "
    "quiet rapid royal rusty shiny silent silver smooth sunny swift tidy vivid warm wild witty young"
).split()
_NOUN = (
    "anchor badger beacon canyon cedar comet crane delta ember falcon fjord forest galaxy garden "
    "harbor island jaguar kettle lagoon lantern meadow meteor nebula oasis orchid otter panda pebble "
    "pepper planet prairie quartz raven ribbon river saddle sparrow summit thunder tiger tulip valley "
    "violet walrus willow zephyr"
).split()


# ----------------------------------------------------------------------------- synthetic examples


@dataclass(frozen=True)
class RetrievalExample:
    """One synthetic retrieval prompt. ``gold_index`` is the 0-based item holding the answer."""

    task: str
    prompt: str
    answer: str
    n_items: int
    gold_index: int
    position: str


def gold_index(position: str, n_items: int) -> int:
    """Item index of a position name (start/middle/end) or a fraction in [0, 1] among ``n_items``."""
    if n_items < 1:
        raise ConfigError(f"a retrieval prompt needs at least 1 item, got {n_items}")
    if position == "middle":
        return (n_items - 1) // 2
    frac = POSITIONS.get(position)
    if frac is None:
        try:
            frac = float(position)
        except ValueError:
            frac = -1.0
        if not 0.0 <= frac <= 1.0:
            raise ConfigError(f"position {position!r} is not start, middle, end or a fraction in [0, 1]")
    return round(frac * (n_items - 1))


def _example_rng(seed: int, task: str, n_items: int, position: str, sample: int) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`: stable across runs and Python versions
    return random.Random(f"rsq-longctx|{seed}|{task}|{n_items}|{position}|{sample}")


def line_keys(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct ``word-word`` keys."""
    if n > len(_ADJ) * len(_NOUN):
        raise ConfigError(f"at most {len(_ADJ) * len(_NOUN)} lines are supported, got {n}")
    pairs = rng.sample(range(len(_ADJ) * len(_NOUN)), n)
    return [f"{_ADJ[p // len(_NOUN)]}-{_NOUN[p % len(_NOUN)]}" for p in pairs]


def make_lines_example(n_lines: int, position: str, rng: random.Random) -> RetrievalExample:
    """LongEval-style lines retrieval with the asked line at ``position``."""
    keys = line_keys(rng, n_lines)
    values = rng.sample(range(1, 50001), n_lines)
    gi = gold_index(position, n_lines)
    record = "\n".join(f"line {k}: REGISTER_CONTENT is <{v}>" for k, v in zip(keys, values))
    prompt = (
        "Below is a record of lines I want you to remember. Each line starts with 'line <line index>' "
        "and ends with a number called REGISTER_CONTENT. Memorize the REGISTER_CONTENT of every line "
        "index: at the end of the record I will ask for the REGISTER_CONTENT of one line.\n\n"
        f"Record start:\n{record}\nRecord end.\n\n"
        f"What is the REGISTER_CONTENT in line {keys[gi]}? Answer with the number only."
    )
    return RetrievalExample("lines", prompt, str(values[gi]), n_lines, gi, position)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_kv_example(n_pairs: int, position: str, rng: random.Random) -> RetrievalExample:
    """Lost-in-the-Middle-style key-value retrieval with the asked key at ``position``."""
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n_pairs:
        k = _uuid(rng)
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = [_uuid(rng) for _ in keys]
    gi = gold_index(position, n_pairs)
    body = ",\n ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in zip(keys, values))
    prompt = (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        f"JSON data:\n{{{body}}}\n\n"
        f"Key: {json.dumps(keys[gi])}\nCorresponding value:"
    )
    return RetrievalExample("kv", prompt, values[gi], n_pairs, gi, position)


MAKERS: dict[str, Callable[[int, str, random.Random], RetrievalExample]] = {
    "lines": make_lines_example,
    "kv": make_kv_example,
}


def make_example(task: str, n_items: int, position: str, seed: int, sample: int) -> RetrievalExample:
    if task not in MAKERS:
        raise ConfigError(f"unknown long-context task {task!r}: choose from {', '.join(TASKS)}")
    return MAKERS[task](n_items, position, _example_rng(seed, task, n_items, position, sample))


# ----------------------------------------------------------------------------- scoring


_INT = re.compile(r"\d+")


def first_integer(text: str) -> str | None:
    m = _INT.search(text)
    return (m.group(0).lstrip("0") or "0") if m else None


def score_retrieval(task: str, output: str, answer: str) -> bool:
    """lines: first integer of ``output`` equals ``answer``; kv: ``answer`` occurs in ``output``."""
    if task == "lines":
        return first_integer(output) == answer.lstrip("0")
    return answer.lower() in output.lower()


# ----------------------------------------------------------------------------- model I/O


def use_chat(tokenizer, chat: str | bool) -> bool:
    if chat == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(chat)


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of ``text`` as one user turn (chat) or as raw text (with the tokenizer's specials)."""
    if chat:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)
    return list(tokenizer(text).input_ids)


def model_context(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def fast_decoding(model: nn.Module, compile: bool | None, max_cache_len: int) -> dict:
    """``generate`` kwargs of a run (rsq.generation.decode_kwargs): static cache + compiled decode step
    (None: on CUDA, not on the CPU), one cache of ``max_cache_len`` for every prompt of the run so
    that the step compiles once."""
    device = next(model.parameters()).device
    return decode_kwargs(device, compile, max_cache_len=max_cache_len)


@torch.no_grad()
def greedy_answer(model: nn.Module, tokenizer, ids: list[int], max_new_tokens: int, fast: dict | None = None) -> str:
    """Greedy continuation of ``ids`` (batch of one), decoded without special tokens; ``fast``:
    extra ``generate`` kwargs (:func:`fast_decoding`)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
        **(fast or {}),
    )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def items_for_budget(task: str, tokenizer, budget: int, *, chat: bool, seed: int = 0) -> int:
    """Largest item count whose prompt (position ``end``, sample 0) has at most ``budget`` tokens.

    Other samples differ by a few tokens; they are checked against the model's context when run.
    """

    def n_tokens(n: int) -> int:
        return len(encode_prompt(tokenizer, make_example(task, n, "end", seed, 0).prompt, chat))

    if n_tokens(1) > budget:
        raise ConfigError(f"a token budget of {budget} cannot hold even one {task} item: use a larger --tokens")
    lo, hi = 1, 2
    cap = len(_ADJ) * len(_NOUN)
    while hi < cap and n_tokens(hi) <= budget:
        lo, hi = hi, min(2 * hi, cap)
    if hi == cap and n_tokens(hi) <= budget:
        return hi
    while hi - lo > 1:  # invariant: n_tokens(lo) <= budget < n_tokens(hi)
        mid = (lo + hi) // 2
        if n_tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def parse_positions(text: str | Sequence[str]) -> list[str]:
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if str(p).strip()]
    for p in items:
        gold_index(p, 2)  # validates
    if not items:
        raise ConfigError("no positions given: pass e.g. --positions start,middle,end")
    return items


@dataclass(frozen=True)
class RetrievalOptions:
    """What :func:`run_retrieval` asks. Lengths are ``items`` (item counts) plus ``tokens``
    (budgets, or ``"max"`` = the model's context minus ``max_new_tokens``), each converted with
    :func:`items_for_budget`. ``samples`` prompts per (length, position), each with its own random
    keys and values. ``compile``: static cache + compiled decoding (None: on CUDA;
    :func:`fast_decoding`). ``keep_outputs``: each example row keeps the model's answer text."""

    items: Sequence[int] = ()
    tokens: Sequence[int | str] = ()
    positions: Sequence[str] = ("start", "middle", "end")
    samples: int = 5
    seed: int = 0
    max_new_tokens: int | None = None
    chat: str | bool = "auto"
    keep_outputs: bool = True
    compile: bool | None = None


def run_retrieval(
    model: nn.Module,
    tokenizer,
    task: str = "lines",
    options: RetrievalOptions | None = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    **fields,
) -> dict:
    """Accuracy of ``task`` by length and by gold position (model on its current device), as
    ``options`` (:class:`RetrievalOptions`; ``fields`` replace some of its fields) say."""
    opts = replace(options or RetrievalOptions(), **fields)
    if task not in TASKS:
        raise ConfigError(f"unknown long-context task {task!r}: choose from {', '.join(TASKS)}")
    if opts.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {opts.samples}")
    positions = parse_positions(opts.positions)
    new_tokens = opts.max_new_tokens or DEFAULT_NEW_TOKENS[task]
    chat_on = use_chat(tokenizer, opts.chat)
    context = model_context(model)
    lengths = _lengths(task, tokenizer, opts, context - new_tokens if context is not None else None, chat_on)

    model.eval()
    t_start = time.perf_counter()
    longest = max(
        len(encode_prompt(tokenizer, make_example(task, n, "end", opts.seed, 0).prompt, chat_on)) for n, _ in lengths
    )
    cache_len = longest + new_tokens + 64  # other samples and positions differ by a few tokens
    fast = fast_decoding(model, opts.compile, cache_len if context is None else min(cache_len, context))
    rows, skipped = [], []
    total = len(lengths) * len(positions) * opts.samples
    done = 0
    for n, budget in lengths:
        for pos in positions:
            for k in range(opts.samples):
                ex = make_example(task, n, pos, opts.seed, k)
                ids = encode_prompt(tokenizer, ex.prompt, chat_on)
                if context is not None and len(ids) + new_tokens > context:
                    skipped.append(
                        {
                            "items": n,
                            "position": pos,
                            "sample": k,
                            "tokens": len(ids),
                            "reason": f"prompt + {new_tokens} new tokens exceeds the context {context}",
                        }
                    )
                else:
                    row = {"items": n, "budget": budget, "position": pos, "sample": k}
                    rows.append(row | _answer(model, tokenizer, task, ex, ids, new_tokens, fast, opts.keep_outputs))
                done += 1
                if progress is not None:
                    progress(f"{task} {n} items", done, total)
    if skipped:
        log.warning("%s: skipped %d prompts longer than the model's context %s", task, len(skipped), context)
    return {
        "task": task,
        "scoring": "first integer of the answer equals the line's number"
        if task == "lines"
        else "gold value occurs in the answer (case-insensitive)",
        "decoding": f"greedy, max_new_tokens={new_tokens}, chat_template={chat_on}",
        "model_context": context,
        "samples": opts.samples,
        "seed": opts.seed,
        "positions": positions,
        **aggregate(rows, positions),
        "skipped": skipped,
        "examples": rows,
        "seconds": time.perf_counter() - t_start,
    }


def _lengths(task: str, tokenizer, opts: RetrievalOptions, room: int | None, chat_on: bool) -> list:
    """[(item count, token budget or None)]: ``opts.items`` as given, then each of ``opts.tokens``
    converted (``"max"``: ``room``, the context minus the new tokens)."""
    lengths: list[tuple[int, int | None]] = [(int(n), None) for n in opts.items]
    for b in opts.tokens:
        if b == "max":
            if room is None:
                raise ConfigError("the model config has no max_position_embeddings: pass a number to --tokens")
            b = room
        lengths.append((items_for_budget(task, tokenizer, int(b), chat=chat_on, seed=opts.seed), int(b)))
    if not lengths:
        raise ConfigError("no lengths given: pass --lines N,... or --tokens BUDGET,...")
    if any(n < 1 for n, _ in lengths):
        raise ConfigError("item counts must be >= 1")
    return lengths


def _answer(model, tokenizer, task: str, ex, ids, new_tokens: int, fast, keep_outputs: bool) -> dict:
    """One example's row: the model's greedy answer scored against the gold one."""
    t0 = time.perf_counter()
    output = greedy_answer(model, tokenizer, ids, new_tokens, fast)
    row = {
        "gold_index": ex.gold_index,
        "tokens": len(ids),
        "answer": ex.answer,
        "correct": score_retrieval(task, output, ex.answer),
        "seconds": time.perf_counter() - t0,
    }
    if keep_outputs:
        row["output"] = output
    return row


def _acc(rows: list[dict]) -> float | None:
    return sum(r["correct"] for r in rows) / len(rows) if rows else None


def aggregate(rows: list[dict], positions: Sequence[str]) -> dict:
    """Accuracy overall, by position, and per length (with its mean prompt tokens) by position."""
    lengths = []
    for n in sorted({r["items"] for r in rows}):
        sub = [r for r in rows if r["items"] == n]
        lengths.append(
            {
                "items": n,
                "tokens": sum(r["tokens"] for r in sub) / len(sub),
                "n": len(sub),
                "accuracy": _acc(sub),
                "by_position": {p: _acc([r for r in sub if r["position"] == p]) for p in positions},
            }
        )
    return {
        "accuracy": _acc(rows),
        "n": len(rows),
        "by_position": {p: _acc([r for r in rows if r["position"] == p]) for p in positions},
        "lengths": lengths,
    }


def run_longctx(model: nn.Module, tokenizer, tasks: Sequence[str] = ("lines",), *, device: str = "auto", **kw) -> dict:
    """:func:`run_retrieval` for each task; the dict that ``rsq longctx --json-out`` writes."""
    model.to(resolve_device(device))
    return {"kind": "longctx", "tasks": {t: run_retrieval(model, tokenizer, t, **kw) for t in tasks}}


# ----------------------------------------------------------------------------- benchmark loaders


@dataclass
class LongExample:
    """One long-context benchmark item: a long ``context``, a ``question``, gold ``answers``."""

    id: str
    context: str
    question: str
    answers: list[str]
    metric: str
    meta: dict = field(default_factory=dict)

    def prompt(self) -> str:
        return f"{self.context}\n\n{self.question}" if self.context else self.question


def _read_jsonl(path: str | Path, what: str, hint: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} data not found at {p}: {hint}")
    rows = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{p} line {i} is not JSON ({exc.msg}): pass a jsonl file, one object per line"
                ) from exc
    if not rows:
        raise ConfigError(f"{p} holds no examples: pass a non-empty jsonl file")
    return rows


def _require(row: dict, fields: dict[str, type | tuple], where: str) -> None:
    for name, typ in fields.items():
        if name not in row:
            raise ConfigError(f"{where} lacks the field {name!r} (expected fields: {', '.join(fields)})")
        if not isinstance(row[name], typ):
            want = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise ConfigError(f"{where}: field {name!r} should be {want}, got {type(row[name]).__name__}")


def load_leval(path: str | Path, limit: int | None = None) -> list[LongExample]:
    """L-Eval task file -> one example per (document, instruction). Fields: see the module doc."""
    rows = _read_jsonl(
        path,
        "L-Eval",
        "download L-Eval (github.com/OpenLMLab/LEval, LEval-data/) and pass a "
        "task file such as LEval-data/Closed-ended-tasks/tpo.jsonl",
    )
    out = []
    for i, row in enumerate(rows):
        where = f"{path} line {i + 1}"
        _require(row, {"input": str, "instructions": list, "outputs": list}, where)
        if len(row["instructions"]) != len(row["outputs"]):
            raise ConfigError(f"{where}: {len(row['instructions'])} instructions but {len(row['outputs'])} outputs")
        for j, (q, a) in enumerate(zip(row["instructions"], row["outputs"])):
            out.append(
                LongExample(
                    f"{i}.{j}",
                    row["input"],
                    str(q),
                    [str(a)],
                    "leval_exam",
                    {"source": row.get("source"), "evaluation": row.get("evaluation")},
                )
            )
    return out[:limit] if limit else out


def load_longiclbench(
    train_path: str | Path,
    test_path: str | Path,
    *,
    rounds: int = 1,
    label_names: Sequence[str] | None = None,
    input_name: str = "query",
    label_name: str = "label",
    limit: int | None = None,
) -> list[LongExample]:
    """LongICLBench-style prompts: ``rounds`` rounds of per-label demonstrations, then each test text."""
    hint = (
        'write the dataset\'s train/test splits as jsonl of {"text", "label"} (e.g. banking77 from '
        "github.com/TIGER-AI-Lab/LongICLBench) and pass both paths"
    )
    train = _read_jsonl(train_path, "LongICLBench train", hint)
    test = _read_jsonl(test_path, "LongICLBench test", hint)
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")

    def label(row: dict, where: str) -> str:
        _require(row, {"text": str, "label": (str, int)}, where)
        lab = row["label"]
        if isinstance(lab, int):
            if label_names is None or not 0 <= lab < len(label_names):
                raise ConfigError(f"{where}: integer label {lab} needs label_names (a list of class names)")
            return label_names[lab]
        return lab

    by_label: dict[str, list[str]] = {}
    for i, row in enumerate(train):
        by_label.setdefault(label(row, f"{train_path} line {i + 1}"), []).append(row["text"])
    demos = []
    for r in range(rounds):
        for lab, texts in by_label.items():
            if r < len(texts):
                demos.append(f"{input_name}: {texts[r]}\n{label_name}: {lab}")
    context = (
        f"Given a {input_name}, predict its {label_name}. The answer must be one of the {label_name}s "
        f"used in the examples, written exactly the same way. The examples are:\n\n" + "\n\n".join(demos)
    )
    out = []
    for i, row in enumerate(test):
        gold = label(row, f"{test_path} line {i + 1}")
        out.append(
            LongExample(
                str(i),
                context,
                f"{input_name}: {row['text']}\n{label_name}:",
                [gold],
                "label",
                {"rounds": rounds, "demonstrations": len(demos)},
            )
        )
    return out[:limit] if limit else out


def load_lca_library(path: str | Path, limit: int | None = None) -> list[LongExample]:
    """Long Code Arena library-based code generation file -> examples scored by API recall."""
    rows = _read_jsonl(
        path,
        "Long Code Arena",
        "export JetBrains-Research/lca-library-based-code-generation (test split) to jsonl and pass its path",
    )
    out = []
    for i, row in enumerate(rows):
        where = f"{path} line {i + 1}"
        _require(row, {"instruction": str, "unique_apis": list}, where)
        ref = row.get("clean_reference", row.get("reference"))
        if not isinstance(ref, str):
            raise ConfigError(f"{where} lacks the field 'clean_reference' (or 'reference'): the gold code")
        out.append(
            LongExample(
                str(row.get("repo_full_name", i)),
                str(row.get("context", "")),
                row["instruction"],
                [str(a) for a in row["unique_apis"]],
                "api_recall",
                {"reference": ref},
            )
        )
    return out[:limit] if limit else out


_LETTERS = re.compile(r"^[\s(\[]*([A-E](?:[\s,)\]]*[A-E])*)[\s)\].]*$")


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def score_long(metric: str, output: str, answers: list[str]) -> float:
    """Score of one generated ``output`` (0..1) under a loader's metric (see the module doc)."""
    if metric == "leval_exam":
        gold = answers[0].strip()
        m = _LETTERS.match(gold)
        if m:
            first = output.strip().splitlines()[0] if output.strip() else ""
            return float(set(re.findall(r"\b[A-E]\b", first)) == set(re.findall(r"[A-E]", m.group(1))))
        return float(_norm(gold) in _norm(output))
    if metric == "label":
        first = output.strip().splitlines()[0].strip() if output.strip() else ""
        return float(first == answers[0].strip())
    if metric == "api_recall":
        if not answers:
            return 1.0
        names = [a.split(".")[-1] for a in answers]
        return sum(bool(re.search(rf"\b{re.escape(n)}\b", output)) for n in names) / len(names)
    raise ConfigError(f"unknown long-context metric {metric!r}")


def run_examples(
    model: nn.Module,
    tokenizer,
    examples: list[LongExample],
    *,
    max_new_tokens: int = 64,
    chat: str | bool = "auto",
    progress: Callable[[str, int, int], None] | None = None,
    compile: bool | None = None,
) -> dict:
    """Greedy answers to loaded benchmark examples; mean score, skipping prompts over the context.
    ``compile``: static cache + compiled decoding (None: on CUDA; :func:`fast_decoding`)."""
    chat_on = use_chat(tokenizer, chat)
    context = model_context(model)
    prompts = [encode_prompt(tokenizer, ex.prompt(), chat_on) for ex in examples]
    fits = [len(ids) + max_new_tokens for ids in prompts if context is None or len(ids) + max_new_tokens <= context]
    fast = fast_decoding(model, compile, max(fits)) if fits else {}
    rows, skipped = [], []
    for i, (ex, ids) in enumerate(zip(examples, prompts)):
        if context is not None and len(ids) + max_new_tokens > context:
            skipped.append({"id": ex.id, "tokens": len(ids)})
        else:
            output = greedy_answer(model, tokenizer, ids, max_new_tokens, fast)
            rows.append(
                {"id": ex.id, "tokens": len(ids), "score": score_long(ex.metric, output, ex.answers), "output": output}
            )
        if progress is not None:
            progress("long examples", i + 1, len(examples))
    return {
        "score": sum(r["score"] for r in rows) / len(rows) if rows else None,
        "n": len(rows),
        "skipped": skipped,
        "examples": rows,
    }


__all__ = [
    "RetrievalExample",
    "LongExample",
    "make_example",
    "make_lines_example",
    "make_kv_example",
    "gold_index",
    "score_retrieval",
    "items_for_budget",
    "run_retrieval",
    "run_longctx",
    "aggregate",
    "load_leval",
    "load_longiclbench",
    "load_lca_library",
    "score_long",
    "run_examples",
]
