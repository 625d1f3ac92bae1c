"""Bad command-line input gives one clear line (exit 2) before any model is loaded or file written.

Most cases here fail in the argument checks, so no model loads; the few that run one use the tiny
``ckpt_a`` or the shipped demo model.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

from deepseek_jax import cli
from deepseek_jax.commands.demo import demo_checkpoint


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc, err, needle):
    assert rc == 2, err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(p, np.arange(1, 10, dtype=np.int32)[None])   # [1, 9]
    return str(p)


# ---- score --------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--out", "{tmp}/nodir/x.npy"], "--out: directory"),
    (["--logprobs", "{tmp}/nodir/lp.npy"], "--logprobs: directory"),
    (["--out", "{tmp}"], "--out: {tmp} is a directory"),
    (["--out", "{tmp}/same.npy", "--logprobs", "{tmp}/same.npy"], "same file"),
    (["--out", "{tmp}/o.npy", "--prefill", "4"], "--prefill 4 needs --mode decode"),
    (["--out", "{tmp}/o.npy", "--mode", "decode", "--prefill", "-1"], "--prefill must be >= 0"),
    (["--out", "{tmp}/o.npy", "--mode", "decode", "--prefill", "10"], "--prefill 10 exceeds"),
    (["--out", "{tmp}/o.npy", "--mtp", "--mode", "decode"], "--mtp"),
    (["--out", "{tmp}/o.npy", "--num-processes", "2"], "--num-processes needs --coordinator"),
    (["--out", "{tmp}/o.npy", "--heartbeat-timeout", "0"], "--heartbeat-timeout must be > 0"),
    (["--out", "{tmp}/o.npy", "--coordinator", "localhost", "--num-processes", "1", "--process-id", "0"],
     "--coordinator: expected HOST:PORT"),                           # was "list index out of range"
    (["--out", "{tmp}/o.npy", "--coordinator", "127.0.0.1:99999", "--num-processes", "1", "--process-id", "0"],
     "a port in 1..65535"),
    (["--out", "{tmp}/o.npy", "--coordinator", "http://h:80", "--num-processes", "1", "--process-id", "0"],
     "expected HOST:PORT"),
    (["--out", "/proc/o.npy"], "--out: cannot write /proc/o.npy"),   # (not the temporary file's name)
])
def test_score_bad_flags(extra, needle, ckpt_a, ids_file, tmp_path, capsys):
    tmp = str(tmp_path)
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, *[a.format(tmp=tmp) for a in extra])
    assert_error(rc, err, needle.format(tmp=tmp))
    assert os.listdir(tmp_path) == []   # nothing written


def test_score_writes_exactly_the_given_paths(ckpt_a, ids_file, tmp_path, capsys):
    out, lp = tmp_path / "logits.txt", tmp_path / "lp"
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", out, "--logprobs", lp)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["logits.txt", "lp"]
    assert np.load(out).shape == (1, 9, 256) and np.load(lp).shape == (1, 8)


# ---- plan ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--prefill-batch", "0"], "--prefill-batch must be >= 1"),
    (["--prefill-batch", "2"], "--prefill-batch 2 exceeds --batch 1"),
    (["--prompt-len", "0"], "--prompt-len must be >= 1"),
    (["--prompt-len", "9999"], "--prompt-len 9999 leaves no room in the default --max-len 256"),
    (["--max-len", "64", "--prompt-len", "65"], "--prompt-len 65 leaves no room in --max-len 64"),
    (["--max-len", "0"], "--max-len must be >= 1"),
    (["--max-len", "4096"], "--max-len 4096 exceeds"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--prefill-chunk", "24"], "--prefill-chunk: expected a power of two"),
    (["--prefill-chunk", "17"], "--prefill-chunk: expected a power of two"),
    (["--mesh", "expert=100000"], "--mesh: expert=100000 is 100000 devices"),   # was minutes of jax start-up
])
def test_plan_bad_flags(extra, needle, capsys):
    rc, _, err = run_cli(capsys, "plan", "--config", "tiny", "--mesh", "expert=1", "--no-compile", *extra)
    assert_error(rc, err, needle)


@pytest.mark.parametrize("config, max_len", [("tiny", 256), ("demo", 128)])
def test_plan_default_max_len_fits_the_config(config, max_len, capsys):
    rc, out, err = run_cli(capsys, "plan", "--config", config, "--mesh", "expert=1", "--no-compile", "--json")
    assert rc == 0, err
    assert json.loads(out)["prefill_tokens"] == max_len


# ---- generate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--prompt-ids", "1,,2"], "empty item"),
    (["--prompt-ids", "1,2,"], "empty item"),
    (["--prompt-ids", "1_0"], "not a comma-separated list of integers"),     # int() would take it as 10
    (["--prompt-ids", "\u0663,4"], "not a comma-separated list of integers"),  # an Arabic-Indic 3
    (["--prompt-ids", "1", "--seed", "-1"], "--seed must be in [0, 2**32)"),  # was the samples of 2**32 - 1
    (["--prompt-ids", "1", "--prefill-chunk", "24"], "--prefill-chunk"),
    (["--prompt-ids", "1", "--num-processes", "2"], "--num-processes needs --coordinator"),
    (["--prompt-ids", "1", "--process-id", "1"], "--process-id needs --coordinator"),
    (["--prompt-ids", "1", "--heartbeat-timeout", "-1"], "--heartbeat-timeout must be > 0"),
    (["--prompt-ids", "1", "--num-processes", "0", "--process-id", "0", "--coordinator", "h:1"],
     "--num-processes must be >= 1"),
    (["--prompt-ids", "1", "--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"],
     "--process-id 2 is out of range"),
])
def test_generate_bad_flags(extra, needle, ckpt_a, capsys):
    rc, _, err = run_cli(capsys, "generate", ckpt_a, *extra)
    assert_error(rc, err, needle)


def test_generate_notes_the_length_cap(ckpt_a, capsys):
    rc, out, err = run_cli(capsys, "generate", ckpt_a, "--prompt-ids", ",".join(["3"] * 250),
                           "--max-new-tokens", "20", "--temperature", "0", "--ignore-eos")
    assert rc == 0, err
    assert "--max-new-tokens 20 capped at 6" in err and len(out.split()) == 6


# ---- train --------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr"),
    (["--warmup", "-5"], "--warmup must be >= 0"),
    (["--data-parallel", "0"], "--data-parallel must be >= 1"),
    (["--seq-len", "0"], "--seq-len must be >= 4"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1]"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--eval-batches", "-1"], "--eval-batches"),
    (["--save-every", "-1"], "--save-every"),
    (["--batch", "3", "--data-parallel", "2"], "--batch 3 must be a multiple of --data-parallel 2"),
    (["--data", "synthetic:copy:foo=1"], "unknown option 'foo' for synthetic:copy (options: min_len, max_len)"),
    (["--init", "no/such/dir"], "--init: no/such/dir is not a checkpoint directory"),
])
def test_train_bad_flags(extra, needle, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--config", "tiny", "--data", "synthetic:copy", "--steps", "1",
                         "--out", out, *extra)
    assert_error(rc, err, needle)
    assert not out.exists()


def test_train_stops_when_it_diverges(tmp_path, capsys):
    """A learning rate that blows the weights up ends the run with one line naming the step; no
    NaN model is exported as if it were finished."""
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--config", "tiny", "--data", "synthetic:copy", "--steps", "3",
                         "--batch", "2", "--eval-batches", "0", "--lr", "1e10", "--clip", "0", "--out", out)
    assert_error(rc, err.splitlines()[-1] + "\n", "training diverged at step")
    assert "Traceback" not in err and "no checkpoint" in err
    assert not (out / "hub").exists() and not (out / "ckpt").exists()
    assert all(np.isfinite(json.loads(line)["loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_demo_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = run_cli(capsys, "demo", "--dir", f)
    assert_error(rc, err, f"--dir {f} is a file, not a directory")
    assert os.listdir(tmp_path) == ["afile"]


# ---- chat / verify ------------------------------------------------------------------------------
def test_chat_without_tokenizer_names_no_foreign_flag(ckpt_a, capsys):
    rc, _, err = run_cli(capsys, "chat", ckpt_a)
    assert_error(rc, err, "tokenizer.json")
    assert "--prompt-ids" not in err


def test_chat_commands_and_overflow(monkeypatch, capsys):
    lines = ["/bogus", "/clear now", "12+30", "9+9 " * 30, "/exit"]   # 122 tokens alone, 132 after 12+30
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    rc, out, err = run_cli(capsys, "chat", demo_checkpoint(), "--max-new-tokens", "4", "--temperature", "0")
    assert rc == 1, err
    assert "unknown command /bogus (commands: /clear, /exit" in err
    assert "/clear takes no arguments" in err
    assert "the conversation is too long" in err and "/clear to start over" in err
    assert len(out.splitlines()) == 1   # only 12+30 was sent to the model


def test_chat_names_bytes_that_are_not_utf8(monkeypatch, capsys):
    """Undecodable stdin bytes (Python's surrogate escapes) were reported as a "lone surrogate" at
    their place in the whole rendered conversation; now the byte and its place in the message."""
    stdin = io.TextIOWrapper(io.BytesIO(b"1+1\n\xff\xfe2+2\n3+3\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdin", stdin)
    rc, out, err = run_cli(capsys, "chat", demo_checkpoint(), "--max-new-tokens", "4", "--temperature", "0")
    assert rc == 1 and len(out.splitlines()) == 2, (out, err)   # the other two turns ran
    assert "error: this message is not UTF-8 text: byte 0xff at character 0" in err and "surrogate" not in err


def test_chat_says_when_the_max_length_cut_a_reply(monkeypatch, capsys):
    """A 125-token conversation leaves 3 of --max-new-tokens 50: the reply ended there with no word
    (generate says so; chat now does too). A reply that ends on its own gets no note."""
    monkeypatch.setattr("sys.stdin", io.StringIO("1" * 122 + "\n"))
    rc, out, err = run_cli(capsys, "chat", demo_checkpoint(), "--max-new-tokens", "50", "--temperature", "0")
    assert rc == 0 and len(out.splitlines()) == 1
    assert "note: the reply was cut at 3 tokens by the model's max length 128 (the conversation has 125)" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("12+30\n"))
    rc, out, err = run_cli(capsys, "chat", demo_checkpoint(), "--max-new-tokens", "50", "--temperature", "0")
    assert rc == 0 and "note:" not in err


def test_chat_system_message_too_long_fails_at_start(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("1+1\n"))
    rc, out, err = run_cli(capsys, "chat", demo_checkpoint(), "--system", "1" * 400, "--max-new-tokens", "4")
    assert_error(rc, err, "--system: the system message takes")
    assert out == ""


def test_chat_input_edge_cases(monkeypatch, capsys, tmp_path):
    """What chat did with inputs beyond plain lines (each measured before its fix): a byte-order
    mark starting piped input went into the message (12+34 was answered 55, not 46, and "/exit"
    after it was sent as a message); a closed stdin was an AttributeError traceback after the model
    loaded; a --system of undecodable bytes was "a lone surrogate at character 21" of the rendered
    template; a template that is not valid jinja failed every turn after the model loaded; a short
    message after a long --system was "too long" without naming the system message; /clear kept
    counting turns, so its first reply sampled otherwise than a fresh session's; an interactive
    session's ">>> " prompts went into a redirected stdout."""
    d = demo_checkpoint()
    flags = ("--max-new-tokens", "6", "--temperature", "0")

    def chat(stdin, *more):
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
        return run_cli(capsys, "chat", d, *flags, *more)

    rc, plain, _ = chat("12+34\n")
    assert rc == 0 and plain.strip()
    assert chat("\ufeff12+34\n") == (0, plain, "")
    rc, out, _ = chat("\ufeff/exit\n12+34\n")
    assert rc == 0 and out == ""
    rc, out, err = chat(None)
    assert_error(rc, err, "chat reads its messages from stdin, which is closed")
    rc, out, err = chat("1+1\n", "--system", b"\xff\xfe".decode("utf-8", "surrogateescape"))
    assert_error(rc, err, "--system is not UTF-8 text: byte 0xff at character 0")
    bad = tmp_path / "badjinja"
    shutil.copytree(d, bad)
    tc = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": "{% for m in messages %}"}))
    monkeypatch.setattr("sys.stdin", io.StringIO("1+1\n2+2\n"))
    rc, out, err = run_cli(capsys, "chat", bad)
    assert_error(rc, err, "chat_template is not valid jinja (line 1)")
    assert out == ""
    rc, out, err = chat("12+34\n", "--system", "1" * 120)
    assert rc == 1 and "this message is too long: 128 tokens with the system message's 123, at most 127" in err
    sampled = ("--temperature", "3", "--seed", "5", "--max-new-tokens", "10")
    rc, out, _ = chat("hello there\n/clear\nhello there\n", *sampled)
    assert rc == 0 and len(out.splitlines()) == 2 and out.splitlines()[0] == out.splitlines()[1], out

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    rc, out, err = chat(Terminal("12+34\n"))
    assert rc == 0 and out == plain and err.count(">>> ") == 2, (out, err)


def test_output_encoding_without_a_generated_character(monkeypatch, capsys):
    """stdout in ASCII (PYTHONIOENCODING=ascii) and a sampled reply holding U+FFFD: a
    UnicodeEncodeError traceback, in chat and generate; now the character is escaped."""
    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="ascii"))
    rc = cli.main(["chat", demo_checkpoint(), "--temperature", "5", "--seed", "3", "--top-k", "50", "--top-p", "0.95",
               "--max-new-tokens", "12"])
    sys.stdout.flush()
    assert rc == 0 and b"\\ufffd" in raw.getvalue(), (capsys.readouterr().err, raw.getvalue())


def test_verify_checks_against_first(ckpt_a, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "verify", ckpt_a, "--against", tmp_path / "nothere", "--quiet")
    assert_error(rc, err, "--against:")


def test_verify_names_a_missing_array_in_one_short_line(ckpt_a, tmp_path, capsys):
    """An array folder gone from an Orbax checkpoint: its name and tensorstore's reason, without the
    ~500-character JSON spec tensorstore appends to its message."""
    orb = tmp_path / "orb"
    assert cli.main(["convert", ckpt_a, str(orb)]) == 0
    capsys.readouterr()
    gone = sorted(p for p in os.listdir(orb) if p.endswith(".weight.value"))[0]
    import shutil
    shutil.rmtree(orb / gone)
    rc, _, err = run_cli(capsys, "verify", orb)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and gone in line and "tensorstore_spec" not in line and len(line) < 400, err


def test_distributed_env_zero_processes(monkeypatch, ids_file, ckpt_a, tmp_path, capsys):
    """``DEEPSEEK_JAX_NUM_PROCESSES=0`` was read as "not given" (``0 or ...``)."""
    monkeypatch.setenv("DEEPSEEK_JAX_NUM_PROCESSES", "0")
    monkeypatch.setenv("DEEPSEEK_JAX_PROCESS_ID", "0")
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", tmp_path / "o.npy",
                         "--coordinator", "127.0.0.1:1")
    assert_error(rc, err, "--num-processes must be >= 1")


def test_a_training_run_without_its_model(tmp_path, capsys):
    """A run that stopped before exporting OUT/hub (diverged, killed): the error blamed a missing
    tokenizer.json, or pointed at OUT/hub, which does not exist."""
    (tmp_path / "run.json").write_text("{}")
    rc, _, err = run_cli(capsys, "generate", tmp_path, "--prompt", "1+1")
    assert_error(rc, err, "is a training run's output that holds no trained model yet")


def test_distributed_env_without_a_coordinator(monkeypatch, ids_file, ckpt_a, tmp_path, capsys):
    """A process count from the environment with no coordinator ran as one process (each host its
    own job, every one writing as process 0); the flags were refused."""
    monkeypatch.setenv("DEEPSEEK_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("DEEPSEEK_JAX_PROCESS_ID", "0")
    monkeypatch.delenv("DEEPSEEK_JAX_COORDINATOR", raising=False)
    rc, _, err = run_cli(capsys, "score", ckpt_a, "--ids", ids_file, "--out", tmp_path / "o.npy")
    assert_error(rc, err, "DEEPSEEK_JAX_NUM_PROCESSES needs --coordinator HOST:PORT")
    assert not (tmp_path / "o.npy").exists()


def test_harness_module_without_lm_eval_is_one_line():
    """``python -m deepseek_jax.harness`` where lm_eval is not installed (it is an extra): one
    line naming the package to install, exit 2, no traceback."""
    import subprocess
    import sys
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['harness', '--tasks', 'x']; "
            "runpy.run_module('deepseek_jax.harness', run_name='__main__', alter_sys=True)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "pip install 'lm_eval" in p.stderr and "Traceback" not in p.stderr
