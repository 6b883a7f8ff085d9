"""Tiny models and data for tests: built from configs, seeded, seconds to create."""

from __future__ import annotations

import random

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from flexkd.data import IGNORE

VOCAB = 97


def tiny_bert_classifier(hidden=16, layers=2, labels=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    conf = AutoConfig.for_model(
        "bert",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=labels,
        pad_token_id=0,
    )
    return AutoModelForSequenceClassification.from_config(conf).to(dtype).eval()


def tiny_llama(hidden=16, layers=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    conf = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(conf).to(dtype).eval()


def random_examples(n: int, task: str, seed: int = 0, labels: int = 3) -> list[dict]:
    """Encoded examples of random lengths; LM labels follow the loop's convention (shifted, IGNORE elsewhere)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 11)
        ids = [rng.randint(1, VOCAB - 1) for _ in range(length)]
        if task == "classification":
            out.append({"input_ids": ids, "labels": rng.randrange(labels)})
        else:
            start = rng.randint(1, length - 2)  # response starts here: positions start-1.. predict it
            lab = [IGNORE] * (start - 1) + ids[start:] + [IGNORE]
            out.append({"input_ids": ids, "labels": lab})
    return out
