"""The built-in demo task: generated movie-review sentences, learnable by tiny models on 2 CPUs in minutes.

A review is 2-4 clauses ("the plot was not very dull"). Each clause has a polarity: the adjective's sign,
flipped by a negator ("not", "never"), doubled by an intensifier ("very", "truly"), and a clause after "but"
counts twice. Two tasks read the same reviews:

- ``classification``: the label is the sign of the summed polarity (no ties are generated). A bag of words
  gets about 3/4 right; negation, intensity and "but" need the word order, which a small model trained briefly
  has not learned yet, and a fine-tuned teacher has.
- ``instruction``: "which aspects were praised?"; the response lists, in order, the aspects whose clause is
  positive after negation (or "none"). Scored by exact match and ROUGE-L.

Everything is deterministic in the seed, and the vocabulary is closed, so a word-level tokenizer built here
(no files, no network) covers it.
"""

from __future__ import annotations

import functools
import random

ASPECTS = [
    "plot",
    "acting",
    "music",
    "ending",
    "script",
    "cast",
    "story",
    "dialogue",
    "pacing",
    "camera",
    "humor",
    "villain",
]
VERBS = ["was", "is", "seemed", "felt"]
POSITIVE = ["good", "great", "fun", "moving", "clever", "brilliant", "charming", "superb", "tense", "fresh"]
NEGATIVE = ["bad", "dull", "boring", "weak", "awful", "messy", "bland", "clumsy", "flat", "silly"]
NEGATORS = ["not", "never"]
INTENSIFIERS = ["very", "truly"]
JOINERS = ["and", "but"]
FILLERS = [
    "the",
    "honestly",
    "overall",
    "i",
    "think",
    "none",
    "review",
    "which",
    "aspects",
    "were",
    "praised",
]
LABELS = ["negative", "positive"]
INSTRUCTION = "which aspects were praised ?"
SPECIAL = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
    "bos": "[BOS]",
    "eos": "[EOS]",
}
# Words of the default prompt templates (flexkd.data.TEMPLATES), so that every prompt tokenizes without [UNK].
TEMPLATE_WORDS = ["###", "Instruction", "Input", "Response", ":", "Summarize", "Summary", "?", ","]

SIZES = {"train": 20000, "validation": 1000, "test": 1000}


def _clause(rng: random.Random) -> tuple[str, str, int]:
    aspect = rng.choice(ASPECTS)
    positive = rng.random() < 0.5
    words = ["the", aspect, rng.choice(VERBS)]
    sign = 1 if positive else -1
    if rng.random() < 0.35:
        words.append(rng.choice(NEGATORS))
        sign = -sign
    value = sign
    if rng.random() < 0.3:
        words.append(rng.choice(INTENSIFIERS))
        value *= 2
    words.append(rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words), aspect, value


def make_review(rng: random.Random) -> dict:
    """One review with its label and its praised aspects. Rejection-samples away ties and repeated aspects."""
    while True:
        n = rng.choice([2, 3, 3, 4])
        clauses, aspects, values = [], [], []
        for i in range(n):
            text, aspect, value = _clause(rng)
            if i:
                joiner = rng.choice(JOINERS)
                if joiner == "but":
                    value *= 2
                text = f"{joiner} {text}"
            clauses.append(text)
            aspects.append(aspect)
            values.append(value)
        total = sum(values)
        if total != 0 and len(set(aspects)) == n:
            break
    praised = [a for a, v in zip(aspects, values) if v > 0]
    return {
        "text": " ".join(clauses),
        "label": LABELS[int(total > 0)],
        "praised": " ".join(praised) if praised else "none",
    }


@functools.lru_cache(maxsize=8)
def make_split(split: str, task: str, seed: int = 0) -> list[dict]:
    """Rows of one split in the columns of ``task``; splits use disjoint seeds. Cached: treat as read-only."""
    offset = {"train": 0, "validation": 1, "test": 2}[split]
    rng = random.Random(seed * 10 + offset)
    rows = [make_review(rng) for _ in range(SIZES[split])]
    if task == "classification":
        return [{"text": r["text"], "label": r["label"]} for r in rows]
    if task == "instruction":
        return [{"instruction": INSTRUCTION, "input": r["text"], "response": r["praised"]} for r in rows]
    if task == "summarization":
        return [{"document": r["text"], "summary": r["praised"]} for r in rows]
    raise ValueError(f"data.task: the demo has no {task!r} task")


def vocabulary() -> list[str]:
    words = ASPECTS + VERBS + POSITIVE + NEGATIVE + NEGATORS + INTENSIFIERS + JOINERS + FILLERS + LABELS
    words += TEMPLATE_WORDS
    return list(SPECIAL.values()) + sorted(set(words))


def build_tokenizer(task: str):
    """A word-level fast tokenizer over the closed demo vocabulary.

    Classification gets BERT-style ``[CLS] ... [SEP]``; generation tasks get ``[BOS] ...`` and ``[EOS]`` as the
    end-of-sequence token, so a causal LM learns to stop.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if task == "classification":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        extra = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
        extra = {"bos_token": "[BOS]", "eos_token": "[EOS]"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", **extra)
