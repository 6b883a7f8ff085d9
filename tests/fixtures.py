"""Model folders and data files on disk, for tests that go through configs like a user does."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from flexkd import demo


def save_model(path: Path, task: str, hidden: int, layers: int, tokenizer=None, seed: int = 0) -> Path:
    """A tiny random model folder with the demo tokenizer for ``task`` (or the one given)."""
    tok = tokenizer or demo.build_tokenizer(task)
    torch.manual_seed(seed)
    if task == "classification":
        conf = AutoConfig.for_model(
            "bert",
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            vocab_size=len(tok),
            max_position_embeddings=128,
            num_labels=2,
            pad_token_id=tok.pad_token_id,
        )
        model = AutoModelForSequenceClassification.from_config(conf)
    else:
        conf = AutoConfig.for_model(
            "llama",
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            vocab_size=len(tok),
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(conf)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def other_tokenizer():
    """A word-level tokenizer over a different, smaller vocabulary: it splits the demo's text differently."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "plot", "was", "good", "bad"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mlflow_server(store: Path, port: int, env: dict):
    """A real `mlflow server` on 127.0.0.1:``port`` over an SQLite store and an artifact folder in ``store``,
    in its own process group (the server and its uvicorn worker end together with ``os.killpg``)."""
    import subprocess
    import sys

    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}/mlflow.db",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def on_gloo_ranks(body, world: int, out: Path) -> list:
    """``body(rank)`` on ``world`` spawned processes joined in one gloo group (127.0.0.1, a free port, one
    CPU thread each); returns what each rank's call returned, in rank order. ``body`` must be a module-level
    function (spawn pickles it) and return something ``torch.save`` takes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(body, port, str(out), world), nprocs=world, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def _gloo_rank(rank: int, body, port: int, out: str, world: int) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(body(rank), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
