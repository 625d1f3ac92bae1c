"""Multi-host: 2 processes x 4 CPU devices on 127.0.0.1, launched like a real multi-host job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, *, n=2, env_extra=None, cwd=None, per_process=None, env_per_process=None, stdin=None):
    """``args`` on every process; ``per_process[i]``, a list of arguments, replaces them on process i,
    ``env_per_process[i]`` adds to its environment, ``cwd`` may be a dict of working
    directories by process, and ``stdin[i]`` is process i's standard input (a file or DEVNULL)."""
    port = _free_port()
    procs = []
    for i in range(n):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", **(env_extra or {}), **(env_per_process or {}).get(i, {})}
        mine = (per_process or {}).get(i, args)
        cmd = [sys.executable, "-m", "deepseek_jax.cli", *mine, "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", str(n), "--process-id", str(i), "--heartbeat-timeout", "10"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd.get(i) if isinstance(cwd, dict) else cwd,
                                      stdin=(stdin or {}).get(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


@pytest.fixture(scope="module")
def ids_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("mh") / "ids.npy"
    np.save(p, np.random.default_rng(3).integers(0, 256, (4, 10)).astype(np.int32))
    return str(p)


def test_two_processes_match_one(ckpt_a, ids_path, tmp_path):
    from deepseek_jax import scoring
    from deepseek_jax.api import load

    out = tmp_path / "out.npy"
    procs = _launch(["score", ckpt_a, "--ids", ids_path, "--out", str(out), "--mesh", "data=2,expert=4",
                     "--mode", "decode", "--prefill", "3"])
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    ids = np.load(ids_path)
    ref = scoring.logits(load(ckpt_a), ids, mode="decode", prefill=3)
    got = np.load(out)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_two_processes_internals_match_one(ckpt_a, ids_path, tmp_path):
    """score --internals --attention on 2 processes: the arrays gathered from both hosts."""
    import deepseek_jax as dj
    from deepseek_jax.api import load

    out = tmp_path / "ins.npz"
    procs = _launch(["score", ckpt_a, "--ids", ids_path, "--internals", str(out), "--attention",
                     "--mesh", "data=2,expert=4"])
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    got = np.load(out)
    ref = dj.internals(load(ckpt_a), np.load(ids_path), attention=True)
    np.testing.assert_array_equal(got["experts"], ref.experts)
    for k in ("hidden", "final_hidden", "expert_weights", "expert_scores", "attention"):
        np.testing.assert_allclose(got[k], getattr(ref, k), rtol=1e-4, atol=1e-4, err_msg=k)


def test_dead_peer_makes_the_other_exit(ckpt_a, ids_path, tmp_path):
    """Process 1 dies right after joining; process 0 must fail within the heartbeat bound."""
    out = tmp_path / "out.npy"
    t0 = time.time()
    procs = _launch(["score", ckpt_a, "--ids", ids_path, "--out", str(out), "--mesh", "data=2,expert=4"],
                    env_extra={"DEEPSEEK_JAX_TEST_DIE_AFTER_INIT": "1"})
    try:
        procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("process 0 hung after its peer died")
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == 17
    assert procs[0].returncode != 0
    assert time.time() - t0 < 120
    assert not out.exists()


def test_interrupted_peer_ends_the_run(tmp_path):
    """Ctrl-C on one process of a training run: it printed "interrupted" and then waited in
    jax.distributed's shutdown for its peer, which waited in a collective for it; both hung until
    killed. Now the interrupted process leaves at once and its peer fails by the heartbeat bound."""
    import signal
    out = tmp_path / "run"
    procs = _launch(["train", "--config", "tiny", "--data", "synthetic:addition", "--steps", "100000", "--batch", "8",
                     "--eval-batches", "0", "--save-every", "0", "--out", str(out), "--mesh", "data=8"])
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl") and
                                              len(open(out / "metrics.jsonl").readlines()) >= 3):
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGINT)
        t0 = time.time()
        outs = [p.communicate(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("a process hung after its peer was interrupted")
    finally:
        for p in procs:
            p.kill()
    assert time.time() - t0 < 120
    assert procs[1].returncode == 130 and "process 1 of 2: interrupted" in outs[1][1], outs[1][1][-2000:]
    assert procs[0].returncode != 0


def test_only_process_0_needs_the_output_folder(ckpt_a, ids_path, tmp_path):
    """Process 0 alone writes score's outputs: a relative --out whose folder only process 0's
    working directory holds stopped process 1 ("directory res does not exist") and aborted
    process 0 after a minute in JAX's initialisation."""
    hosts = {i: tmp_path / f"host{i}" for i in (0, 1)}
    for d in hosts.values():
        d.mkdir()
    (hosts[0] / "res").mkdir()
    procs = _launch(["score", ckpt_a, "--ids", ids_path, "--out", "res/out.npy", "--mesh", "data=2,expert=4"],
                    cwd=hosts)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert (hosts[0] / "res" / "out.npy").exists() and os.listdir(hosts[1]) == []


def test_chat_on_two_processes_reads_process_0s_stdin(tmp_path):
    """Each process read its own stdin: process 1 given none left at once, and process 0 waited in
    a collective until a JAX traceback (Gloo's DEADLINE_EXCEEDED). Now process 0 reads and every
    process runs its lines: the replies are one process's, printed once."""
    from deepseek_jax.commands.demo import demo_checkpoint
    (tmp_path / "in.txt").write_text("\ufeff12+34\n5+6\n")
    args = ["chat", demo_checkpoint(), "--temperature", "0", "--max-new-tokens", "6"]
    one = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", *args], stdin=open(tmp_path / "in.txt"),
                         capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"})
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 2, one.stderr[-2000:]
    procs = _launch(args + ["--mesh", "expert=8"], stdin={0: open(tmp_path / "in.txt"), 1: subprocess.DEVNULL})
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    # Gloo (the CPU collectives) prints its own connection lines to stdout from several threads, so
    # they can arrive cut into pieces: look for the replies as whole lines, not for a clean stdout.
    want = one.stdout.splitlines()
    assert [line for line in outs[0][0].splitlines() if line in want] == want, outs[0][0]
    assert not [line for line in outs[1][0].splitlines() if line in want], outs[1][0]


def test_processes_given_other_inputs_or_a_partial_mesh_stop_with_one_line(ckpt_a, ids_path, tmp_path):
    """Process 1 reading other ids (same file name on its host, other values) computed its own rows,
    and process 0 wrote a result mixing both; a --mesh of process 0's devices only crashed process 1.
    Now every process stops with the same line (exit 2), before loading anything."""
    hosts = {i: tmp_path / f"host{i}" for i in (0, 1)}   # one path, other contents on each "host"
    for i, d in hosts.items():
        d.mkdir()
        np.save(d / "ids.npy", np.load(ids_path)[::(1 if i == 0 else -1)].copy())
    out = tmp_path / "out.npy"
    base = ["score", ckpt_a, "--out", str(out), "--mesh", "data=2,expert=4"]
    cases = [(None, base + ["--ids", "ids.npy"], "process 1 differs from process 0 in the contents of --ids ids.npy"),
             ({1: base + ["--ids", "ids.npy", "--mode", "decode"]}, base + ["--ids", "ids.npy"],
              "process 1 differs from process 0 in the command's arguments"),
             (None, ["score", ckpt_a, "--ids", ids_path, "--out", str(out), "--mesh", "expert=4"],
              "--mesh expert=4 uses 4 of the 8 devices of 2 processes")]
    for per_process, args, needle in cases:
        procs = _launch(args, per_process=per_process, cwd=hosts)
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, outs):
            ours = [line for line in err.splitlines() if line.startswith("deepseek-jax")]
            assert p.returncode == 2 and len(ours) == 1 and needle in ours[0], err[-2000:]
            assert "Traceback" not in err
        assert not out.exists()


def test_two_processes_generate_the_same_tokens(ckpt_a):
    import json

    from deepseek_jax.api import load
    from deepseek_jax.generate import Generator
    from deepseek_jax.sampling import SamplingParams

    prompts = [[0, 5, 17, 33], [0, 9]]
    procs = _launch(["generate", ckpt_a, "--prompt-ids", "0,5,17,33", "--prompt-ids", "0,9",
                     "--max-new-tokens", "10", "--temperature", "0", "--ignore-eos", "--json",
                     "--mesh", "data=2,expert=4"])
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    ours = [[line for line in o[0].splitlines() if line.startswith("{")] for o in outs]  # not gloo's own lines
    assert ours[1] == []                                # only process 0 prints
    got = [json.loads(line)["output_ids"] for line in ours[0]]
    ref = Generator(load(ckpt_a)).generate(prompts, max_new_tokens=10, sampling=SamplingParams(temperature=0),
                                           stop_at_eos=False)
    assert got == [r.output_ids for r in ref]


def test_every_process_says_why_it_failed(ckpt_a):
    """generate / chat sent the other processes' stderr to /dev/null with their stdout: a process
    that failed exited 2 without a word. Each now prints its one line, naming the process."""
    procs = _launch(["generate", ckpt_a, "--prompt-ids", "0,5,99999", "--max-new-tokens", "2", "--mesh", "data=2,expert=4"])
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        ours = [line for line in err.splitlines() if line.startswith("deepseek-jax")]
        assert p.returncode == 2 and len(ours) == 1, err[-2000:]
        assert f"process {i} of 2: error:" in ours[0] and "99999" in ours[0], ours
        assert "Traceback" not in err


def test_processes_with_other_device_counts_or_other_out_dirs_stop_with_one_line(ckpt_a, ids_path, tmp_path):
    """Processes with 4 and 2 devices failed in the agreement check's all-gather with a traceback
    ("cannot reshape array of size 6"); a training run whose relative --out named another
    directory on each host (other working directories) trained, then hung at its first save."""
    procs = _launch(["score", ckpt_a, "--ids", ids_path, "--json", "--mesh", "data=2,expert=3"],
                    env_per_process={1: {"JAX_NUM_CPU_DEVICES": "2"}})
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        ours = [line for line in err.splitlines() if line.startswith("deepseek-jax")]
        assert p.returncode == 2 and len(ours) == 1 and "Traceback" not in err, err[-2000:]
        assert f"this process has {4 if i == 0 else 2} of the 6 devices of 2 processes" in ours[0]
    # 2, 4 and 3 devices: the process with the mean count (3 = 9 / 3) had passed the check and
    # waited in the all-gather for peers that had left
    procs = _launch(["score", ckpt_a, "--ids", ids_path, "--json", "--mesh", "data=9"], n=3,
                    env_per_process={0: {"JAX_NUM_CPU_DEVICES": "2"}, 2: {"JAX_NUM_CPU_DEVICES": "3"}})
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        ours = [line for line in err.splitlines() if line.startswith("deepseek-jax")]
        assert p.returncode == 2 and len(ours) == 1 and f"process {i} of 3: error: this process has" in ours[0], err[-2000:]
    hosts = {i: tmp_path / f"host{i}" for i in (0, 1)}
    for d in hosts.values():
        d.mkdir()
    procs = _launch(["train", "--config", "tiny", "--data", "synthetic:addition", "--steps", "2", "--batch", "8",
                     "--out", "run", "--mesh", "data=8"], cwd=hosts)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        ours = [line for line in err.splitlines() if line.startswith("deepseek-jax")]
        assert p.returncode == 2 and len(ours) == 1 and "Traceback" not in err, err[-2000:]
        assert "process 1 does not see process 0's directory" in ours[0], ours
    assert not any((d / "run" / "ckpt").exists() for d in hosts.values())


def test_two_processes_train_lora_like_one(tmp_path):
    """``train --lora-rank`` over an FP8 checkpoint on a mesh spanning 2 processes
    (data=2, expert=2, model=2): the FP8 weights loaded sharded, the adapters replicated, the
    batch split over both hosts. Its per-step losses, held-out metrics and exported Hub tensors
    equal one process on one device; only process 0 writes the files; ``--resume`` restores the
    sharded state on both processes and exports the same tensors again."""
    import json

    from deepseek_jax.cli import main
    from deepseek_jax.hub import HubReader
    from deepseek_jax.synthetic import random_hub_checkpoint, tiny_config

    cfg = tiny_config(vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                      q_lora_rank=32, kv_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                      topk_group=1, max_position_embeddings=64)
    init = str(random_hub_checkpoint(tmp_path / "init", cfg, seed=4, fp8=True))
    args = ["train", "--init", init, "--data", "synthetic:addition", "--batch", "8", "--steps", "3",
            "--eval-batches", "1", "--lora-rank", "4", "--bias-gamma", "0.01"]
    mesh = ["--mesh", "data=2,expert=2,model=2"]

    def two(out, *extra):
        procs = _launch(args + ["--out", str(out), *mesh, *extra])
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
        return outs

    outs = two(tmp_path / "mh")
    assert "16 devices" not in outs[0][0] and "8 devices (mesh data=2,expert=2,model=2, 2 processes)" in outs[0][0]
    assert "step 3:" not in outs[1][0]                   # only process 0 prints
    assert main(args + ["--out", str(tmp_path / "one")]) == 0

    def metrics(out):
        return [json.loads(line) for line in open(out / "metrics.jsonl")]

    got, want = metrics(tmp_path / "mh"), metrics(tmp_path / "one")
    assert [m["step"] for m in got] == [0, 1, 2]         # one line per step: process 0 alone wrote it
    for g, w in zip(got, want):
        for k in ("loss", "ce", "mtp_ce", "grad_norm", "imbalance"):
            assert abs(g[k] - w[k]) <= 1e-4 * max(1.0, abs(w[k])), (k, g, w)
    ev_got, ev_want = (json.load(open(tmp_path / d / "eval.json")) for d in ("mh", "one"))
    assert abs(ev_got["loss"] - ev_want["loss"]) < 1e-4

    def tensors(hub):
        r = HubReader(str(hub))
        try:
            return {k: r.get(k).astype(np.float32) for k in r.names()}
        finally:
            r.close()

    a, b = tensors(tmp_path / "mh" / "hub"), tensors(tmp_path / "one" / "hub")
    assert a.keys() == b.keys()
    for k in a:   # BF16 exports: equal up to one BF16 rounding step of the merged weights
        np.testing.assert_allclose(a[k], b[k], rtol=1e-2, atol=1e-3, err_msg=k)
    # resume: the checkpoint restored onto the 2-process mesh, nothing left to train, the same export
    os.rename(tmp_path / "mh" / "hub", tmp_path / "hub_first")
    two(tmp_path / "mh", "--resume", "--eval-batches", "0")
    c = tensors(tmp_path / "mh" / "hub")
    for k, v in tensors(tmp_path / "hub_first").items():
        np.testing.assert_array_equal(c[k], v, err_msg=k)
