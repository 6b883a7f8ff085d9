"""Teacher and student models and tokenizers: Hugging Face names, local folders, or tiny architectures from configs."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from flexkd import demo
from flexkd.checks import arch_heads
from flexkd.config import Config, ConfigError


def model_class(task: str):
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def load_tokenizer(source: str, task: str):
    """A tokenizer by folder or Hub name, or the demo's word-level tokenizer for 'demo'."""
    if source == "demo":
        return demo.build_tokenizer(task)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer: cannot load {source!r}: {str(err).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Causal LMs often ship without one; padding positions are masked out everywhere, so EOS serves.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def teacher_tokenizer(cfg: Config, prepared: bool = True):
    """The teacher's tokenizer: from teacher.path once it exists, else from teacher.base / teacher.tokenizer."""
    if prepared:
        return load_tokenizer(cfg.teacher.path, cfg.data.task)
    return load_tokenizer(cfg.teacher.tokenizer or cfg.teacher.base, cfg.data.task)


def student_tokenizer(cfg: Config, teacher_tok):
    """A pretrained student has its own tokenizer; one built from an architecture uses student.tokenizer, or
    the teacher's when that is empty (the pre-flight checks make sure the two tokenize alike)."""
    source = cfg.student.path or cfg.student.tokenizer
    return load_tokenizer(source, cfg.data.task) if source else teacher_tok


def _task_kwargs(task: str, label_names: list[str]) -> dict:
    if task != "classification":
        return {}
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def _token_ids(tok) -> dict:
    ids = {"pad_token_id": tok.pad_token_id}
    if tok.bos_token_id is not None:
        ids["bos_token_id"] = tok.bos_token_id
    if tok.eos_token_id is not None:
        ids["eos_token_id"] = tok.eos_token_id
    return ids


def config_from_arch(
    arch: dict, tok, task: str, label_names: list[str], like: PretrainedConfig | None = None
):
    """A transformers config from an architecture dict; fields it leaves out come from ``like`` (the teacher)."""
    fields = dict(arch)
    model_type = fields.pop("model_type", None) or (like.model_type if like is not None else None)
    if model_type is None:
        raise ConfigError("student.arch.model_type: missing, and there is no teacher config to copy it from")
    base = {}
    if like is not None and like.model_type == model_type:
        base = {
            k: v
            for k, v in like.to_dict().items()
            if k not in ("architectures", "_name_or_path", "transformers_version")
        }
        base.pop("model_type", None)
    heads = arch_heads(fields, base, "student.arch" if like is not None else "teacher.arch")
    base.update(fields)
    base.update(heads)
    base.update(vocab_size=len(tok), **_token_ids(tok), **_task_kwargs(task, label_names))
    try:
        return AutoConfig.for_model(model_type, **base)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"arch.model_type: {model_type!r}: {str(err).splitlines()[0]}") from None


def load_pretrained(
    source: str, task: str, label_names: list[str], tok, dtype=torch.float32
) -> PreTrainedModel:
    kwargs = _task_kwargs(task, label_names)
    if task == "classification":
        # A causal-LM backbone used as a classifier needs to know the pad id to find each row's last token.
        kwargs["pad_token_id"] = tok.pad_token_id
    try:
        return model_class(task).from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        raise ConfigError(f"model: cannot load {source!r}: {str(err).splitlines()[0]}") from None


def build_student(
    cfg: Config, tok, label_names: list[str], teacher_config: PretrainedConfig | None
) -> PreTrainedModel:
    """The student: pretrained from student.path, or freshly initialised from student.arch (seeded by run.seed)."""
    if cfg.student.path:
        return load_pretrained(cfg.student.path, cfg.data.task, label_names, tok)
    conf = config_from_arch(cfg.student.arch, tok, cfg.data.task, label_names, like=teacher_config)
    torch.manual_seed(cfg.run.seed)
    return model_class(cfg.data.task).from_config(conf)


def build_teacher_base(cfg: Config, tok, label_names: list[str]) -> PreTrainedModel:
    """What `flexkd teacher` starts from: teacher.base, or a fresh model from teacher.arch."""
    if cfg.teacher.base:
        return load_pretrained(cfg.teacher.base, cfg.data.task, label_names, tok)
    conf = config_from_arch(cfg.teacher.arch, tok, cfg.data.task, label_names)
    torch.manual_seed(cfg.run.seed)
    return model_class(cfg.data.task).from_config(conf)


def load_teacher(cfg: Config, tok, label_names: list[str]) -> PreTrainedModel:
    """The fine-tuned teacher, frozen: eval mode (no dropout) and no parameter gradients."""
    model = load_pretrained(cfg.teacher.path, cfg.data.task, label_names, tok)
    return freeze(model)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hidden_size(config: PretrainedConfig) -> int:
    text = getattr(config, "text_config", None) or config
    return int(text.hidden_size)


def num_layers(config: PretrainedConfig) -> int:
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers)
