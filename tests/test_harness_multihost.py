"""The lm-evaluation-harness backend on 2 processes x 2 CPU devices on 127.0.0.1, launched as a
multi-host job is (the same command on every host, joined by jax.distributed): every process runs
every request on the one mesh, only process 0 prints and writes, and the answers are those of a
one-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import deepseek_jax as dj
from deepseek_jax.errors import DeepSeekError

import lm_eval   # a test dependency: missing, the file fails, not skips

from deepseek_jax.harness import DeepSeekLM, _results_on_process_0

PROBLEMS = [(846, 483), (50, 563), (760, 792), (98, 96), (7, 183), (949, 412)]
LABELS = [1, 1, 2, 1, 0, 1]      # choice 1 is the sum: two labels are wrong, so acc is not 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _task(demo, path) -> None:
    """A local multiple-choice task (as tests/test_harness.py's), its dataset built beforehand
    into a cache that every run then only reads."""
    import datasets

    from deepseek_jax.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(demo)
    rows = []
    for (a, b), label in zip(PROBLEMS, LABELS):
        s = a + b
        rows.append({"context": tok.apply_chat_template([{"role": "user", "content": f"{a}+{b}"}]),
                     "choices": [str(s + 1), str(s), str(s - 10)], "label": label})
    (path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "demo_addition.yaml").write_text(
        "task: demo_addition\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {path / 'data.jsonl'}\n  cache_dir: {path / 'cache'}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\ntarget_delimiter: ""\nmetric_list:\n'
        "  - metric: acc\n    higher_is_better: true\n  - metric: acc_norm\n    higher_is_better: true\n")
    # and the same questions answered by greedy generation, cut at the first "3"
    (path / "demo_generation.yaml").write_text(
        "task: demo_generation\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {path / 'data.jsonl'}\n  cache_dir: {path / 'cache'}\ntest_split: test\n"
        'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{choices[1]}}"\n'
        'generation_kwargs:\n  until: ["3"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    higher_is_better: true\n")
    datasets.load_dataset("json", data_files={"test": str(path / "data.jsonl")}, cache_dir=str(path / "cache"))


def _harness(model_args: str, task_dir, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "deepseek_jax.harness", "--model", "deepseek_jax",
                             "--model_args", model_args, "--tasks", "demo_addition,demo_generation",
                             "--include_path", str(task_dir), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _loglikelihoods(samples) -> dict[int, list[tuple[float, bool]]]:
    """doc_id -> each choice's (log-likelihood, is_greedy), from lm_eval's logged samples."""
    out = {}
    for s in samples:
        out[s["doc_id"]] = [(float(lp), str(greedy) == "True") for lp, greedy in s["filtered_resps"]]
    return out


def test_two_processes_match_one(tmp_path, monkeypatch):
    demo = dj.demo_checkpoint()
    _task(demo, tmp_path)
    port = _free_port()
    out = tmp_path / "out"
    # Both processes write to the same --output_path, as hosts sharing a file system would.
    procs = [_harness(f"pretrained={demo},batch_size=8,mesh='data=2,expert=2',coordinator=127.0.0.1:{port},"
                      f"num_processes=2,process_id={i},heartbeat_timeout=10", tmp_path,
                      "--output_path", str(out), "--log_samples") for i in range(2)]
    # Meanwhile the one-process reference, through lm_eval's own evaluator, on one device.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ref = lm_eval.simple_evaluate(model=DeepSeekLM(demo, batch_size=8), tasks=["demo_addition", "demo_generation"],
                                  log_samples=True,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path)))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]

    # only process 0 writes the results and samples, and prints the table
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(written) == 3, written
    [result] = list(out.rglob("results_*.json"))
    [samples] = list(out.rglob("samples_demo_addition_*.jsonl"))
    [generated] = list(out.rglob("samples_demo_generation_*.jsonl"))
    assert "|demo_addition  |" in outs[0][0] and "|demo_generation|" in outs[0][0]
    assert "demo_" not in outs[1][0], outs[1][0][-2000:]

    # the metrics and every choice's log-likelihood and greedy flag: the one-process run's
    want, got = ref["results"], json.loads(result.read_text())["results"]
    assert want["demo_addition"]["acc,none"] == pytest.approx(4 / 6)   # every sum right; two labels are off
    assert want["demo_generation"]["exact_match,none"] == pytest.approx(3 / 6)  # 3 sums have no "3" to cut at
    for task, key in (("demo_addition", "acc,none"), ("demo_addition", "acc_norm,none"),
                      ("demo_addition", "acc_stderr,none"), ("demo_generation", "exact_match,none")):
        assert got[task][key] == pytest.approx(want[task][key], abs=1e-12), (task, key)
    got_ll = _loglikelihoods(map(json.loads, samples.read_text().splitlines()))
    want_ll = _loglikelihoods(ref["samples"]["demo_addition"])
    assert sorted(got_ll) == sorted(want_ll) == list(range(len(PROBLEMS)))
    for doc in want_ll:
        assert [g for _, g in got_ll[doc]] == [g for _, g in want_ll[doc]], doc
        assert [lp for lp, _ in got_ll[doc]] == pytest.approx([lp for lp, _ in want_ll[doc]], abs=5e-5), doc
    # the generated texts
    texts = {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, generated.read_text().splitlines())}
    assert texts == {s["doc_id"]: s["filtered_resps"] for s in ref["samples"]["demo_generation"]}


def test_bad_host_setting_on_the_command_line(tmp_path, monkeypatch, capsys):
    """A bad multi-host setting ends lm_eval's command line with one line and exit status 2
    (run in this process: `python -m deepseek_jax.harness` is this main())."""
    from deepseek_jax import harness
    demo = dj.demo_checkpoint()
    _task(demo, tmp_path)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lm_eval.simple_evaluate)   # main() wraps it: undone after
    monkeypatch.setattr(sys, "argv", ["harness", "--model", "deepseek_jax", "--model_args",
                                      f"pretrained={demo},coordinator=127.0.0.1:1,num_processes=2,process_id=2",
                                      "--tasks", "demo_addition", "--include_path", str(tmp_path)])
    assert harness.main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "deepseek_jax.harness: error: process_id 2 is out of range for num_processes 2 (0..1)"


def test_bad_host_arguments():
    demo = dj.demo_checkpoint()
    for kw, msg in ((dict(num_processes=2, process_id=0), "num_processes needs coordinator HOST:PORT"),
                    (dict(num_processes="x", coordinator="h:1"), "num_processes must be an integer, got 'x'"),
                    (dict(heartbeat_timeout=0, coordinator="h:1"), "heartbeat_timeout must be > 0 seconds"),
                    (dict(coordinator=12355), "coordinator must be HOST:PORT, got 12355"),
                    (dict(mesh=4), "mesh must be AXIS=SIZE"),
                    (dict(mesh="data=64"), "mesh: data=64 needs 64 devices"),
                    (dict(rules="tp"), "rules must be one of ep_tp, ep_dp, got 'tp'"),
                    (dict(distributed="on"), "distributed must be one of off, auto, got 'on'")):
        with pytest.raises(DeepSeekError, match=msg):
            DeepSeekLM(demo, **kw)
    lm = DeepSeekLM(demo)
    with pytest.raises(DeepSeekError, match="coordinator, num_processes apply to pretrained=DIR"):
        DeepSeekLM(model=lm.model, tokenizer=lm.tokenizer, coordinator="h:1", num_processes=2)
    # lm_eval's --use_cache would keep one cache per host: refused before anything runs
    run = _results_on_process_0(lambda **kw: pytest.fail("ran"))
    with pytest.raises(DeepSeekError, match="--use_cache is not supported on more than one process"):
        run(model="deepseek_jax", model_args={"pretrained": demo, "coordinator": "h:1"}, use_cache="c")
    assert _results_on_process_0(lambda **kw: kw)(model="deepseek_jax", model_args={}, use_cache="c") == \
        {"model": "deepseek_jax", "model_args": {}, "use_cache": "c"}
