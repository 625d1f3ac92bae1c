"""Chat data (``--data FILE.jsonl``): each conversation rendered with the chat template into one row,
the loss on exactly the assistant turns, padding, the seeded order and the held-out split, the
seq-len rule, one-line input errors, and one short ``train`` run.

Only the last test compiles anything; the others need just the tokenizer.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deepseek_jax.errors import DeepSeekError
from deepseek_jax.tasks import ChatDataset, load_tokenizer, make_dataset
from deepseek_jax.tokenizer import Tokenizer

TOK = load_tokenizer()
EOS = TOK.eos_token
ASSISTANT = TOK.token_to_id("<｜Assistant｜>")

PAIR = {"prompt": "what is 2+2?", "completion": "four, I think"}
MULTI = {"messages": [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "héllo wörld 😀"},
    {"role": "user", "content": "and more?"},
    {"role": "assistant", "content": "sure: 1 2 3"},
]}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) spans where a boolean mask is set."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_loss_mask_is_exactly_the_assistant_turns(tmp_path):
    """The masked tokens decode to exactly the assistant contents plus eos, turn by turn; each turn
    starts right after an ``<｜Assistant｜>`` marker; the row is the template's rendering."""
    data = ChatDataset(write_jsonl(tmp_path / "c.jsonl", [PAIR, MULTI]), TOK, batch_size=2)
    assert data.line_numbers == [1, 2]
    cases = [([PAIR["completion"]], [{"role": "user", "content": PAIR["prompt"]},
                                     {"role": "assistant", "content": PAIR["completion"]}]),
             (["héllo wörld 😀", "sure: 1 2 3"], MULTI["messages"])]
    batch = data.batch_at(0)
    for b, k in enumerate(data.indices_at(0)):
        answers, messages = cases[k]
        ids, mask, valid = batch.ids[b], batch.loss_mask[b] > 0, batch.valid[b]
        assert list(ids[valid]) == TOK.encode_chat(messages, add_generation_prompt=False)
        assert TOK.decode(ids[mask], skip_special=False) == "".join(a + EOS for a in answers)
        spans = runs(mask)
        assert len(spans) == len(answers)
        for (s, e), answer in zip(spans, answers):
            assert ids[s - 1] == ASSISTANT and ids[e - 1] == TOK.eos_id
            assert TOK.decode(ids[s:e], skip_special=False) == answer + EOS
        # Nothing of the system / user turns is a target.
        rest = TOK.decode(ids[valid & ~mask], skip_special=False)
        assert all(m["content"] in rest for m in messages if m["role"] != "assistant")
        assert not any(a in rest for a in answers)


def test_rows_padding_order_and_split(tmp_path):
    """Right padding with the pad id; seq_len the longest rounded up to 8; batches a pure function
    of (seed, split, step) that visit every conversation once per epoch; every 20th held out."""
    rows = [{"prompt": f"question {i}", "completion": "x" * (i % 7) + f" answer {i}"} for i in range(45)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    tr = make_dataset(path, TOK, batch_size=4, seed=3)
    ev = make_dataset(path, TOK, batch_size=4, seed=3, split="eval", seq_len=tr.seq_len)
    assert isinstance(tr, ChatDataset)
    longest = max(len(i) for i in tr.ids + ev.ids)
    assert tr.seq_len % 8 == 0 and longest <= tr.seq_len < longest + 8
    assert ev.line_numbers == [20, 40] and sorted(tr.line_numbers + ev.line_numbers) == list(range(1, 46))

    b = tr.batch_at(5)
    assert b.ids.shape == b.loss_mask.shape == b.valid.shape == (4, tr.seq_len)
    assert b.ids.dtype == np.int32 and b.loss_mask.dtype == np.float32 and b.valid.dtype == bool
    for ids, mask, valid, k in zip(*b, tr.indices_at(5)):
        n = len(tr.ids[k])
        assert valid[:n].all() and not valid[n:].any()
        assert (ids[n:] == tr.pad_id).all() and list(ids[:n]) == list(tr.ids[k])
        assert not mask[~valid].any() and mask[valid].any()

    same = make_dataset(path, TOK, batch_size=4, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(b, same.batch_at(5)))
    assert not np.array_equal(b.ids, tr.batch_at(6).ids)
    assert tr.indices_at(5) != make_dataset(path, TOK, batch_size=4, seed=4).indices_at(5)
    # 43 train conversations: steps 0..42 with batch 1 are one epoch, in a fresh order each epoch.
    one = ChatDataset(path, TOK, batch_size=1, seed=3)
    epoch0 = [one.indices_at(s)[0] for s in range(43)]
    epoch1 = [one.indices_at(s)[0] for s in range(43, 86)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(43)) and epoch0 != epoch1
    # The held-out set never shows up in training batches.
    seen = {tr.line_numbers[k] for s in range(30) for k in tr.indices_at(s)}
    assert seen == set(tr.line_numbers) and not seen & {20, 40}
    assert {ev.line_numbers[k] for s in range(3) for k in ev.indices_at(s)} == {20, 40}

    d = tr.describe()
    assert d["data"] == str((tmp_path / "c.jsonl").resolve()) and d["format"] == "chat"
    assert (d["batch"], d["seq_len"], d["seed"], d["conversations"], d["left_out"]) == (4, tr.seq_len, 3, 43, 0)
    # Fewer than 20 conversations: both splits are all of them.
    small = write_jsonl(tmp_path / "small.jsonl", rows[:19])
    assert ChatDataset(small, TOK, batch_size=2, split="eval").line_numbers == list(range(1, 20))


def test_seq_len_leaves_out_what_does_not_fit(tmp_path, capsys):
    rows = [PAIR, {"prompt": "long " * 40, "completion": "y"}, PAIR, MULTI]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    full = ChatDataset(path, TOK, batch_size=2)
    lens = [len(i) for i in full.ids]
    assert full.describe()["left_out"] == 0 and capsys.readouterr().err == ""
    cut = ChatDataset(path, TOK, batch_size=2, seq_len=max(lens[0], lens[3]))
    assert cut.line_numbers == [1, 3, 4] and cut.describe()["left_out"] == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: ") and "1 of 4" in err and path in err
    assert not any(cut.batch_at(s).valid[:, lens[3]:].any() for s in range(3))
    with pytest.raises(DeepSeekError, match=rf"none of the 4 train conversations .* fits in --seq-len 8 "
                                            rf"\(the shortest has {lens[0]} tokens\)"):
        ChatDataset(path, TOK, batch_size=2, seq_len=8)


GOOD = json.dumps(PAIR).encode()


@pytest.mark.parametrize("content,needle", [
    (GOOD + b"\n{not json\n", "line 2: not valid JSON"),
    (GOOD + b"\n\n\n[1, 2]\n", "line 4: expected a JSON object, got an array"),
    (b'{"text": "hi"}\n', "line 1: needs 'messages', or 'prompt' and 'completion'"),
    (b'{"prompt": "a"}\n', "line 1: needs 'messages', or 'prompt' and 'completion'"),
    (b'{"prompt": "a", "completion": 5}\n', "line 1: 'completion' must be a string"),
    (b'{"messages": []}\n', "line 1: 'messages' must be a non-empty array"),
    (b'{"messages": [{"role": "user"}]}\n', "line 1: message 0 must be an object with string 'role' and 'content'"),
    (b'{"messages": [{"role": "user", "content": 3}]}\n', "line 1: message 0 must be"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}\n',
     "line 1: message 1 has unknown role 'tool'"),
    (GOOD + b'\n{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}\n',
     "line 2: no assistant message (nothing to learn)"),
    (GOOD + b'\n{"prompt": "caf\xe9", "completion": "x"}\n', "line 2: not UTF-8"),
    (GOOD + b'\n{"prompt": "\\ud800", "completion": "x"}\n', "line 2: text holds a lone surrogate"),
    (b"\n  \n", "has no conversations"),
    (None, "not found"),
], ids=["json", "array", "no-form", "no-completion", "completion-type", "no-messages", "no-content",
        "content-type", "role", "no-assistant", "utf8", "surrogate", "empty", "missing"])
def test_bad_input_is_a_one_line_error(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DeepSeekError) as e:
        make_dataset(str(path), TOK, batch_size=2)
    assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_template_that_is_not_prefix_consistent_is_refused(tmp_path):
    """A template whose partial renderings are not prefixes of the whole cannot be masked: refused."""
    odd = Tokenizer(TOK._tok, chat_template="{{ bos_token }}{{ messages|length }}{% for m in messages %}"
                    "<｜User｜>{{ m['content'] }}{% endfor %}", source="odd")
    with pytest.raises(DeepSeekError, match=r"c\.jsonl line 1: the chat template does not render .* prefix"):
        ChatDataset(write_jsonl(tmp_path / "c.jsonl", [PAIR]), odd, batch_size=1)


def test_train_cli_on_chat_data(tmp_path, capsys):
    """``train --data FILE.jsonl``: two steps run with a finite loss, run.json records the data,
    and ``--resume`` after the file changed is refused (before any model is built)."""
    from deepseek_jax.cli import main
    from deepseek_jax.synthetic import tiny_config

    # Smaller than the "tiny" preset (compiles in less time): 1 dense + 1 MoE layer, 8 experts.
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(
        vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32,
        kv_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        max_position_embeddings=64)))
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [PAIR, MULTI, {"prompt": "2+3", "completion": "5"}])
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(path), "--steps", "2", "--batch", "4",
            "--eval-batches", "1", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    metrics = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1] and all(math.isfinite(m["loss"]) for m in metrics)
    data = json.load(open(out / "run.json"))["data"]
    assert data["data"] == str(path.resolve()) and data["format"] == "chat" and data["conversations"] == 3
    assert math.isfinite(json.load(open(out / "eval.json"))["loss"])
    write_jsonl(path, [PAIR, MULTI, {"prompt": "2+3", "completion": "6"}])   # same shape, other contents
    capsys.readouterr()
    assert main(args + ["--resume", "--steps", "3"]) == 2
    assert "different data" in capsys.readouterr().err
    # the file's contents are compared, not its path: a copy elsewhere resumes
    moved = tmp_path / "moved" / "chat.jsonl"
    moved.parent.mkdir()
    write_jsonl(moved, [PAIR, MULTI, {"prompt": "2+3", "completion": "5"}])
    i = args.index("--data")
    assert main(args[:i + 1] + [str(moved)] + args[i + 2:] + ["--resume"]) == 0, capsys.readouterr().err
    # a held-out split that nothing fits: a note, and training without the evaluation
    rows = [{"prompt": f"{k}+1", "completion": str(k + 1)} for k in range(25)]
    rows[19] = {"prompt": "9" * 40, "completion": "1"}   # line 20, the one held out, is too long
    write_jsonl(path, rows)
    capsys.readouterr()
    assert main(args[:-2] + ["--steps", "0", "--seq-len", "24", "--out", str(tmp_path / "noeval")]) == 0
    err = capsys.readouterr().err
    assert "none of the 1 eval conversations" in err and "no held-out evaluation" in err, err
    assert not (tmp_path / "noeval" / "eval.json").exists() and (tmp_path / "noeval" / "hub").is_dir()


def test_text_data_describes_its_contents(tmp_path):
    """``--resume`` compares ``describe()``: a text file changed in place (same path) must differ."""
    from deepseek_jax.tasks import TextDataset
    path = tmp_path / "t.txt"
    path.write_text("one two\nthree four\n")
    a = TextDataset(path, TOK, batch_size=2, seq_len=8).describe()
    path.write_text("one two\nthree five\n")
    b = TextDataset(path, TOK, batch_size=2, seq_len=8).describe()
    assert a["data"] == b["data"] and a["sha256"] != b["sha256"]
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one two\r\nthree five\r\n")          # CRLF lines read as the same lines
    assert np.array_equal(TextDataset(crlf, TOK, batch_size=2, seq_len=8).rows,
                          TextDataset(path, TOK, batch_size=2, seq_len=8).rows)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfone two\nthree five\n")   # a byte-order mark is not text (it was 3 tokens)
    assert np.array_equal(TextDataset(bom, TOK, batch_size=2, seq_len=8).rows,
                          TextDataset(path, TOK, batch_size=2, seq_len=8).rows)
