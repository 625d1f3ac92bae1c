"""The lm-evaluation-harness backend on 2 processes x 2 CPU devices on 127.0.0.1, launched as a
multi-host job is (the same command on every host, joined by jax.distributed): every process runs
every request on the one mesh, only process 0 prints, writes and starts a W&B run, and the answers
are those of a one-process run."""

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


# A stand-in for the wandb package (not installed, no network) under lm_eval's real WandbLogger:
# it records which process starts a run and which finishes one.
FAKE_WANDB = """
import os, sys, types
__version__ = "0.19.0"
run = None

def _mark(what):
    open(os.path.join(os.environ["FAKE_WANDB_DIR"], f"{what}_{os.getpid()}"), "x").close()

class _Run:
    def finish(self):
        _mark("finish")

def init(**kw):
    _mark("init")
    return _Run()

for _name in ("wandb.sdk", "wandb.sdk.lib", "wandb.sdk.lib.printer"):
    sys.modules[_name] = types.ModuleType(_name)
sys.modules["wandb.sdk.lib.printer"].new_printer = lambda: None
"""


def _harness(model_args: str, task_dir, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", **(env or {}))
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
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    runs = tmp_path / "wandb_runs"
    runs.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]),
           "FAKE_WANDB_DIR": str(runs)}
    # Both processes write to the same --output_path, as hosts sharing a file system would.
    procs = [_harness(f"pretrained={demo},batch_size=8,mesh='data=2,expert=2',coordinator=127.0.0.1:{port},"
                      f"num_processes=2,process_id={i},heartbeat_timeout=10", tmp_path,
                      "--output_path", str(out), "--log_samples", "--wandb_args", "project=demo", env=env)
             for i in range(2)]
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
    # lm_eval's W&B logger started (and finished) one run, on process 0
    assert sorted(p.name for p in runs.iterdir()) == [f"finish_{procs[0].pid}", f"init_{procs[0].pid}"]

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
    import lm_eval.loggers
    for module, name in ((lm_eval, "simple_evaluate"), (lm_eval.loggers, "WandbLogger"),
                         (lm_eval.loggers, "TrackioLogger")):   # main() replaces them: undone after
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(sys, "argv", ["harness", "--model", "deepseek_jax", "--model_args",
                                      f"pretrained={demo},coordinator=127.0.0.1:1,num_processes=2,process_id=2",
                                      "--tasks", "demo_addition", "--include_path", str(tmp_path)])
    assert harness.main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "deepseek_jax.harness: error: process_id 2 is out of range for num_processes 2 (0..1)"


def test_processes_with_other_settings_stop(tmp_path):
    """Processes given another batch_size compile other programs and would wait on each other
    until the distributed service aborted them; they all stop first, with the same line."""
    demo = dj.demo_checkpoint()
    port = _free_port()
    code = ("import sys\nfrom deepseek_jax.errors import DeepSeekError\nfrom deepseek_jax.harness import DeepSeekLM\n"
            "try:\n    DeepSeekLM(sys.argv[1], batch_size=sys.argv[2], coordinator=sys.argv[3], num_processes=2,"
            " process_id=int(sys.argv[4]), heartbeat_timeout=10)\n"
            "except DeepSeekError as e:\n    print(e)\n    sys.exit(3)\n")
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, demo, str(batch), f"127.0.0.1:{port}", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, batch in enumerate((8, 4))]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [3, 3], [o[1][-2000:] for o in outs]
    for out, _ in outs:
        assert out.strip().splitlines()[-1].startswith("process 1 differs from process 0 in the command's arguments"), out


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
    # and so is --cache_requests (true|refresh|delete: these arguments): the hosts would share its files
    import inspect

    import lm_eval.evaluator
    assert {"use_cache", "cache_requests", "delete_requests_cache"} <= \
        set(inspect.signature(lm_eval.evaluator.simple_evaluate).parameters)
    for flag in ("cache_requests", "delete_requests_cache"):
        with pytest.raises(DeepSeekError, match="--cache_requests is not supported on more than one process"):
            run(model="deepseek_jax", model_args={"pretrained": demo, "coordinator": "h:1"}, **{flag: True})
    assert _results_on_process_0(lambda **kw: kw)(model="deepseek_jax", model_args={}, use_cache="c",
                                                  cache_requests=True) == \
        {"model": "deepseek_jax", "model_args": {}, "use_cache": "c", "cache_requests": True}


def test_loggers_start_on_process_0_only(monkeypatch):
    """main() has lm_eval's command line make stand-ins for its W&B and Trackio loggers (whose
    constructors start a run): on one process the logger starts before the evaluation; on
    several, on process 0 only, once the model is made (the process index is known then)."""
    import jax
    import lm_eval.loggers

    from deepseek_jax import harness
    events = []

    class Logger:          # stands for lm_eval's WandbLogger, which cannot start a run here
        def __init__(self, init_args, config_args):
            events.append("logger")
            self.run = init_args

    class LM(DeepSeekLM):  # none is loaded here
        def __init__(self, **kw):
            events.append("model")

    def simple_evaluate(model, model_args):   # as lm_eval's: makes the model, then evaluates
        LM.create_from_arg_obj({})
        events.append("evaluate")
        return "results"

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    for name in ("WandbLogger", "TrackioLogger"):      # (main() replaces them: undone after)
        monkeypatch.setattr(lm_eval.loggers, name, getattr(lm_eval.loggers, name))
    real = lm_eval.loggers.WandbLogger
    assert real is lm_eval.loggers.wandb_logger.WandbLogger
    harness._patch_lm_eval()
    stand_in = lm_eval.loggers.WandbLogger
    assert stand_in.func is harness._Process0Logger and stand_in.args == (real,)   # lm_eval's own class
    assert lm_eval.loggers.TrackioLogger.args == (lm_eval.loggers.trackio_logger.TrackioLogger,)

    # one process: the run starts before the evaluation, as lm_eval's does
    logger = stand_in.func(Logger, {"project": "p"}, None)
    assert lm_eval.simple_evaluate(model="deepseek_jax", model_args={}) == "results"
    assert events == ["logger", "model", "evaluate"] and logger.run == {"project": "p"}
    # process 1 of 2: never
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    events.clear()
    logger = stand_in.func(Logger, {"project": "p"}, None)
    assert lm_eval.simple_evaluate(model="deepseek_jax", model_args={"coordinator": "h:1"}) is None
    assert events == ["model", "evaluate"]
    with pytest.raises(DeepSeekError, match="lm_eval's Logger runs on process 0 only"):
        logger.run
    # process 0 of 2: once the model is made
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    events.clear()
    logger = stand_in.func(Logger, {"project": "p"}, None)
    assert lm_eval.simple_evaluate(model="deepseek_jax", model_args={"coordinator": "h:1"}) == "results"
    assert events == ["model", "logger", "evaluate"] and logger.run == {"project": "p"}
