"""Data: the demo task, column maps, templates, loss masks, deterministic splits and batches."""

from __future__ import annotations

import pytest

from flexkd import demo
from flexkd.config import ConfigError, Data
from flexkd.data import (
    IGNORE,
    collate,
    encode,
    encode_prompt,
    load_task_data,
    micro_batches,
    shard_batches,
    step_indices,
    unseen_rows,
)

from .fixtures import write_jsonl

# ---------------------------------------------------------------------------------------------------------
# The demo's labels, recomputed by an independent reading of the sentence


def reread(text: str) -> tuple[int, list[str]]:
    words = text.split()
    total, praised, i = 0, [], 0
    clause_weight = 1
    while i < len(words):
        w = words[i]
        if w in ("and", "but"):
            clause_weight = 2 if w == "but" else 1
            i += 1
            continue
        # "the ASPECT VERB [neg] [int] ADJ"
        aspect = words[i + 1]
        j = i + 3
        sign = 1
        if words[j] in demo.NEGATORS:
            sign, j = -sign, j + 1
        mag = 1
        if words[j] in demo.INTENSIFIERS:
            mag, j = 2, j + 1
        sign *= 1 if words[j] in demo.POSITIVE else -1
        value = sign * mag * clause_weight
        total += value
        if value > 0:
            praised.append(aspect)
        clause_weight = 1
        i = j + 1
    return total, praised


def test_demo_labels_follow_the_documented_rules():
    for row_cls, row_ins in zip(
        demo.make_split("validation", "classification")[:500],
        demo.make_split("validation", "instruction")[:500],
    ):
        total, praised = reread(row_cls["text"])
        assert total != 0
        assert row_cls["label"] == ("positive" if total > 0 else "negative")
        assert row_ins["response"] == (" ".join(praised) or "none")
        assert row_ins["input"] == row_cls["text"]


def test_demo_is_deterministic_and_its_splits_differ():
    assert demo.make_split("train", "classification")[:50] == demo.make_split("train", "classification")[:50]
    assert demo.make_split("train", "classification")[:50] != demo.make_split("test", "classification")[:50]


def test_demo_tokenizer_covers_every_word_of_every_prompt():
    for task in ("classification", "instruction", "summarization"):
        tok = demo.build_tokenizer(task)
        cfg = Data(task=task)
        for row in demo.make_split("validation", task)[:200]:
            ids = encode(row, tok, cfg, demo.LABELS)["input_ids"]
            assert tok.unk_token_id not in ids


# ---------------------------------------------------------------------------------------------------------
# Loss masks and templates


def test_instruction_loss_mask_covers_the_response_and_eos_only():
    tok = demo.build_tokenizer("instruction")
    cfg = Data(task="instruction", max_length=64, max_response_length=8)
    row = {"instruction": "which aspects were praised ?", "input": "the plot was good", "response": "plot"}
    ex = encode(row, tok, cfg, [])
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    prompt = encode_prompt(row, tok, cfg)
    assert ids[: len(prompt)] == prompt
    response = tok("plot", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[len(prompt) :] == response
    # Position t predicts token t + 1: the labelled positions are exactly those whose next token is the response.
    labelled = [t for t, y in enumerate(labels) if y != IGNORE]
    assert labelled == list(range(len(prompt) - 1, len(ids) - 1))
    assert [labels[t] for t in labelled] == response
    assert "### Response" in tok.decode(prompt)


def test_long_prompts_keep_the_template_tail_and_the_response():
    tok = demo.build_tokenizer("instruction")
    cfg = Data(task="instruction", max_length=24, max_response_length=4)
    row = {
        "instruction": "which aspects were praised ?",
        "input": " ".join(["the plot was good and"] * 30),
        "response": "plot acting music ending cast",
    }
    ex = encode(row, tok, cfg, [])
    assert len(ex["input_ids"]) <= 24
    assert tok.decode(ex["input_ids"], skip_special_tokens=True).split()[-4:] == [
        "plot",
        "acting",
        "music",
        "ending",
    ]
    assert sum(1 for y in ex["labels"] if y != IGNORE) == 5  # 4 response tokens + EOS
    assert tok.decode(encode_prompt(row, tok, cfg)).split()[-3:] == ["###", "Response", ":"]


def test_collate_pads_right_and_masks():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE, 7, IGNORE]}, {"input_ids": [8], "labels": [IGNORE]}],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 7, IGNORE], [IGNORE, IGNORE, IGNORE]]


# ---------------------------------------------------------------------------------------------------------
# Files, column maps, splits


def test_local_files_with_a_column_map(tmp_path):
    rows = [
        {"review": f"the plot was good {i}", "stars": "positive" if i % 2 else "negative"} for i in range(40)
    ]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    cfg = Data(
        task="classification",
        source=str(path),
        columns={"text": "review", "label": "stars"},
        val_size=5,
        test_size=5,
    )
    data = load_task_data(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 5, 5)
    assert data.label_names == ["negative", "positive"]
    assert set(data.train[0]) == {"text", "label"}
    again = load_task_data(cfg)
    assert (
        again.val == data.val and again.train.to_list() == data.train.to_list()
    )  # deterministic in data.split_seed
    other = load_task_data(Data(**{**vars(cfg), "split_seed": 7}))
    assert other.val != data.val


def test_unseen_rows_drop_held_out_rows_whose_input_a_training_row_has(tmp_path):
    # Questions repeat with other answers, as in ChatterBot: q0..q9 each twice, q10..q19 once.
    rows = [{"instruction": f"q{i % 20}", "response": f"a{i}"} for i in range(30)]
    cfg = Data(
        task="instruction", source=str(write_jsonl(tmp_path / "qa.jsonl", rows)), val_size=0, test_size=10
    )
    data = load_task_data(cfg)
    asked = {r["instruction"] for r in data.train}
    unseen = unseen_rows(data.test, data.train, "instruction")
    # The slow way: a test row is unseen when no training row has its question, whatever the answers.
    assert unseen == [r for r in data.test if r["instruction"] not in asked]
    assert 0 < len(unseen) < len(data.test)  # this split has both kinds
    # Classification: the text alone decides; a repeated text with another label is still a repeat.
    train = [{"text": "good film", "label": "positive"}, {"text": "bad film", "label": "negative"}]
    held = [{"text": "good film", "label": "negative"}, {"text": "fine film", "label": "positive"}]
    assert unseen_rows(held, train, "classification") == [held[1]]


def test_split_by_input_keeps_every_copy_of_a_question_on_one_side(tmp_path):
    # Questions asked 1, 2 or 3 times with other answers; held-out splits carved by question.
    rows = [{"instruction": f"q{i % 40}", "response": f"a{i}"} for i in range(100)]
    path = str(write_jsonl(tmp_path / "qa.jsonl", rows))
    cfg = Data(task="instruction", source=path, val_size=15, test_size=20, split_by_input=True)
    data = load_task_data(cfg)
    sides = {"train": data.train, "val": data.val, "test": data.test}
    owner: dict[str, str] = {}
    for side, held in sides.items():
        for r in held:
            assert owner.setdefault(r["instruction"], side) == side, r  # one question, one side
    assert sorted(r["response"] for s in sides.values() for r in s) == sorted(r["response"] for r in rows)
    # Whole groups of at most 3 rows: each split reaches its size and overshoots by under a group.
    assert 15 <= len(data.val) < 15 + 3 and 20 <= len(data.test) < 20 + 3
    assert unseen_rows(data.test, data.train, "instruction") == data.test
    # Without it the same cut by rows repeats training questions in the test split.
    plain = load_task_data(Data(task="instruction", source=path, val_size=15, test_size=20))
    assert len(unseen_rows(plain.test, plain.train, "instruction")) < len(plain.test)
    assert load_task_data(cfg).test == data.test  # deterministic in data.split_seed


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_csv_parquet_and_json_load_the_same_rows(tmp_path, fmt):
    import pandas as pd

    rows = [{"text": f"t{i}", "label": i % 3} for i in range(12)]
    frame = pd.DataFrame(rows)
    path = tmp_path / f"d.{fmt}"
    {
        "csv": lambda: frame.to_csv(path, index=False),
        "parquet": lambda: frame.to_parquet(path),
        "json": lambda: frame.to_json(path, orient="records"),
    }[fmt]()
    data = load_task_data(Data(task="classification", source=str(path), val_size=2))
    assert len(data.train) == 10 and data.label_names == ["0", "1", "2"]


def test_a_folder_with_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"document": f"d{i}", "summary": f"s{i}"} for i in range(10)])
    write_jsonl(tmp_path / "validation.jsonl", [{"document": "v", "summary": "w"}])
    data = load_task_data(
        Data(task="summarization", source=str(tmp_path), val_split="validation", val_size=0)
    )
    assert len(data.train) == 10 and data.val == [{"document": "v", "summary": "w"}]


def test_missing_column_names_the_columns_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(
        ConfigError,
        match=r"data.columns.instruction: column 'instruction' is not in .* its columns are prompt, answer",
    ):
        load_task_data(Data(task="instruction", source=str(path), val_size=0))


def test_optional_input_column_may_be_absent(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "say hi", "response": "hi"}] * 4)
    data = load_task_data(Data(task="instruction", source=str(path), val_size=1))
    assert data.train[0]["input"] is None
    tok = demo.build_tokenizer("instruction")
    assert "Input" not in tok.decode(encode_prompt(data.train[0], tok, Data(task="instruction")))


# ---------------------------------------------------------------------------------------------------------
# Batches


def test_global_batches_are_the_same_for_any_worker_count():
    for step in range(7):
        idx = step_indices(step, 12, 50, seed=3)
        assert len(idx) == 12
        for world, accum in ((1, 1), (2, 1), (2, 3), (4, 1)):
            parts = [m for r in range(world) for m in micro_batches(idx, r, world, accum)]
            assert sorted(i for m in parts for i in m) == sorted(idx)
            assert len({len(m) for m in parts}) == 1


def test_epochs_cover_every_example_once():
    seen = [i for step in range(5) for i in step_indices(step, 10, 50, seed=0)]
    assert sorted(seen) == list(range(50))


def test_scoring_shards_are_whole_batches_dealt_round_robin():
    shards = [shard_batches(21, 4, r, 2) for r in range(2)]
    assert [list(b) for b in shards[0]] == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    assert [list(b) for b in shards[1]] == [[4, 5, 6, 7], [12, 13, 14, 15], [20]]
