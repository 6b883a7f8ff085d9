"""The set-up a run and `flexkd score` share: device, tokenizers, data, the teacher, and batches on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig

from flexkd.checks import teacher_ready
from flexkd.config import Config, ConfigError, uses_teacher
from flexkd.data import TaskData, collate, encode, load_task_data
from flexkd.distributed import is_distributed
from flexkd.models import load_teacher, student_tokenizer, teacher_tokenizer


def pick_device(cfg: Config) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("run.device: cuda asked for, but torch sees no CUDA device")
        local = torch.cuda.current_device() if is_distributed() else 0
        return torch.device("cuda", local)
    return torch.device("cpu")


@dataclass
class Workbench:
    cfg: Config
    tok_t: object
    tok_s: object
    data: TaskData
    teacher: torch.nn.Module | None
    teacher_config: object | None  # read even when the teacher's weights are not (a student arch copies it)
    device: torch.device
    scoring_seconds: float | None = None  # set when this process ran a scoring pass (not a cache hit)
    teacher_loads: int = (
        0  # times this process loaded the teacher's weights (0 for a run from cached signals)
    )

    def encode_rows(self, rows: list[dict]) -> list[dict]:
        """Encode with the student's tokenizer; add the teacher's ids when its tokenizer differs (same splits)."""
        out = []
        for i, row in enumerate(rows):
            ex = encode(row, self.tok_s, self.cfg.data, self.data.label_names)
            if self.tok_t is not self.tok_s:
                t_ids = encode(row, self.tok_t, self.cfg.data, self.data.label_names)["input_ids"]
                if len(t_ids) != len(ex["input_ids"]):
                    raise ConfigError(
                        f"{'student.path' if self.cfg.student.path else 'student.tokenizer'}: teacher and "
                        f"student tokenizers split example {i} differently "
                        f"({len(t_ids)} vs {len(ex['input_ids'])} tokens); positions must align one to one"
                    )
                ex["teacher_input_ids"] = t_ids
            out.append(ex)
        return out

    def encode_table(self, rows):
        """The train split encoded once into memory-mapped Arrow files (``flexkd.encoded``), read by index.
        ``rows``: a ``datasets.Dataset`` (a list of dicts is made one)."""
        from flexkd.encoded import encode_table

        if isinstance(rows, list):
            from datasets import Dataset

            rows = Dataset.from_list(rows)
        key = "student.path" if self.cfg.student.path else "student.tokenizer"
        return encode_table(rows, self.tok_s, self.tok_t, self.cfg.data, self.data.label_names, key)

    def batch(self, examples: list[dict]) -> dict:
        return make_batcher(self.tok_t, self.tok_s, self.device)(examples)

    def load_teacher(self) -> torch.nn.Module:
        """The teacher's weights, loaded now if they were not (a run from cached signals that must score)."""
        if self.teacher is None:
            self.teacher = load_teacher(self.cfg, self.tok_t, self.data.label_names).to(self.device)
            self.teacher_loads += 1
        return self.teacher

    def release_teacher(self) -> None:
        self.teacher = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def open_tokenizers(cfg: Config):
    """(teacher tokenizer, student tokenizer); one object when they hold one vocabulary (encode once)."""
    if not uses_teacher(cfg) and (cfg.student.path or cfg.student.tokenizer):
        tok_s = student_tokenizer(cfg, None)  # SFT of a student with its own tokenizer reads no teacher
        return tok_s, tok_s
    tok_t = teacher_tokenizer(cfg)
    tok_s = student_tokenizer(cfg, tok_t)
    if tok_s is not tok_t and tok_s.get_vocab() == tok_t.get_vocab():
        tok_s = tok_t
    return tok_t, tok_s


def make_batcher(tok_t, tok_s, device: torch.device):
    """encoded examples -> a right-padded batch on ``device`` (teacher ids too when the tokenizers differ)."""
    pad_t = tok_t.pad_token_id if tok_t is not tok_s else None

    def batch(examples: list[dict]) -> dict:
        return {k: v.to(device) for k, v in collate(examples, tok_s.pad_token_id, pad_t).items()}

    return batch


def open_workbench(cfg: Config, need_teacher: bool) -> Workbench:
    device = pick_device(cfg)
    tok_t, tok_s = open_tokenizers(cfg)
    data = load_task_data(cfg.data)
    teacher = load_teacher(cfg, tok_t, data.label_names).to(device) if need_teacher else None
    if teacher is not None:
        teacher_config = teacher.config
    elif cfg.teacher.path != "demo" and teacher_ready(cfg):
        teacher_config = AutoConfig.from_pretrained(cfg.teacher.path)
    else:
        teacher_config = None  # fine-tuning the teacher itself: its arch names everything
    return Workbench(
        cfg, tok_t, tok_s, data, teacher, teacher_config, device, teacher_loads=int(need_teacher)
    )
