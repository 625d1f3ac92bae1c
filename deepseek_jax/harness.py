"""A backend for EleutherAI's lm-evaluation-harness (``pip install lm_eval``).

    import lm_eval
    from deepseek_jax.harness import DeepSeekLM

    lm = DeepSeekLM("path/to/checkpoint", batch_size=8)      # Hub layout or Orbax, with tokenizer.json
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

or from the shell, through lm_eval's own command line with this backend registered::

    python -m deepseek_jax.harness --model deepseek_jax --model_args pretrained=DIR,batch_size=8 --tasks ...

The three request kinds map onto this package's batched, compiled paths:

- ``loglikelihood`` (multiple choice): :func:`deepseek_jax.scoring.loglikelihood` -- one prefill
  pass per batch, log-probs and greedy checks taken on the device; a question's context is
  computed once for all its answers (one-token answers share one row; longer answers run over
  copies of the context's latent cache). Tokenization follows the
  harness's causal-LM convention (``TemplateLM``): the context's trailing spaces move to the
  continuation, context + continuation is encoded whole and split at the context's length, and an
  empty context is the bos token.
- ``loglikelihood_rolling`` (perplexity): the text as lm_eval's disjoint rolling windows of at most
  ``max_length`` tokens, after the bos token.
- ``generate_until``: :class:`deepseek_jax.generate.Generator` with the request's ``until`` strings as
  stop strings (and eos), greedy unless ``do_sample`` (then ``temperature``, ``top_p``, ``top_k``).

A context longer than ``max_length`` (default: the config's ``max_position_embeddings``, at most
4096 here unless given) is cut on the left, as the harness's own backends do.

Multi-host (SPMD, as ``deepseek-jax score``/``generate``): the same command runs on every host,
with ``coordinator``, ``num_processes``, ``process_id`` in ``--model_args`` (or the
``DEEPSEEK_JAX_*`` environment variables, or ``distributed=auto``), and the model is loaded over
the mesh of all hosts' devices (``mesh``, ``rules``). lm_eval's own multi-process mode is data
parallel: each rank builds only its slice of the documents (``Task.build_all_requests(rank=,
world_size=)``), runs them alone, and the metrics are gathered with torch collectives. That cannot
drive one model sharded over every host, whose compiled calls must run on all processes at once
with the same shapes. So every process reports rank 0 and world size 1 to lm_eval, builds all the
requests and runs every batch together with its peers. lm_eval's ``simple_evaluate`` returns
``None`` on a process that is not rank 0, and its command line then prints and writes nothing;
``python -m deepseek_jax.harness`` makes it return ``None`` on every process but JAX's process 0,
so only that one prints the table and writes ``--output_path`` (results, ``--log_samples``) and
pushes to the Hub (``--hf_hub_log_args``), and only it starts a ``--wandb_args`` or
``--trackio_args`` run (see :func:`main`). ``--use_cache`` and ``--cache_requests`` are refused
there (see :func:`_results_on_process_0`). From Python, ``simple_evaluate`` returns the results
on every process: write them on process 0.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepseek_jax.errors import DeepSeekError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:   # an optional dependency: say which one
    _missing = (f"deepseek_jax.harness needs lm-evaluation-harness: pip install 'lm_eval>=0.4.13' "
                f"({err})")
    if __name__ == "__main__":   # `python -m deepseek_jax.harness`: one line, as main() gives
        print(f"deepseek_jax.harness: error: {_missing}", file=sys.stderr)
        sys.exit(2)
    raise DeepSeekError(_missing) from None

_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}
_DEFAULT_MAX_LENGTH = 4096
# --model_args of the mesh and of multi-host runs -> the deepseek-jax flags they stand for
# (deepseek_jax/runtime.py, whose messages name the flags; the harness's name the arguments).
_HOST_ARGS = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id",
              "distributed": "--distributed", "heartbeat_timeout": "--heartbeat-timeout", "mesh": "--mesh",
              "rules": "--rules"}


def _integer(name: str, value) -> int:
    """An int, from an int or (as lm_eval's arguments give them) a string of one."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        return int(value)
    except ValueError:
        raise DeepSeekError(f"{name} must be an integer, got {value!r}") from None


def _number(name: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise DeepSeekError(f"{name} must be a number, got {value!r}") from None


def _positive(name: str, value) -> int:
    """An int >= 1, from an int or (as lm_eval's --model_args give them) a string of digits."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())) \
            or int(value) < 1:
        raise DeepSeekError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


_HOST_DEFAULTS = {"mesh": None, "rules": "ep_tp", "coordinator": None, "num_processes": None, "process_id": None,
                  "distributed": "off", "heartbeat_timeout": 30}


def _host_args(**kw: Any) -> argparse.Namespace:
    """The mesh and multi-host arguments, checked, as the namespace :func:`runtime.init` takes."""
    for name in ("mesh", "coordinator"):
        if kw[name] is not None and not (isinstance(kw[name], str) and kw[name]):
            what = "AXIS=SIZE,... (quoted on lm_eval's command line: mesh='data=2,expert=4')" if name == "mesh" \
                else "HOST:PORT"
            raise DeepSeekError(f"{name} must be {what}, got {kw[name]!r}")
    for name, choices in (("rules", ("ep_tp", "ep_dp")), ("distributed", ("off", "auto"))):
        if kw[name] not in choices:
            raise DeepSeekError(f"{name} must be one of {', '.join(choices)}, got {kw[name]!r}")
    for name in ("num_processes", "process_id", "heartbeat_timeout"):
        if kw[name] is not None:
            kw[name] = _integer(name, kw[name])
    return argparse.Namespace(**kw)


def _init_mesh(hosts: argparse.Namespace):
    """:func:`deepseek_jax.runtime.init` (``jax.distributed.initialize`` when asked, then the mesh
    of all processes' devices) when a mesh or more than one process is asked for; otherwise
    ``None``: one device. runtime's messages name its flags; these, the arguments."""
    import jax

    from deepseek_jax import runtime
    try:
        runtime.check_args(hosts)
        if (hosts.mesh is None and not hosts.coordinator and hosts.distributed == "off"
                and not os.environ.get("DEEPSEEK_JAX_COORDINATOR") and not jax.distributed.is_initialized()):
            return None
        return runtime.init(hosts)
    except DeepSeekError as e:
        msg = str(e)
        for name, flag in _HOST_ARGS.items():
            msg = msg.replace(flag, name)
        raise DeepSeekError(msg) from None


def _ep_capacity(value: float | str | None) -> float | None:
    """``ep_capacity`` as lm_eval's ``--model_args`` gives it (a string) or Python does."""
    from deepseek_jax import runtime

    if isinstance(value, str):
        try:
            return runtime.ep_capacity(value)
        except argparse.ArgumentTypeError as e:
            raise DeepSeekError(f"ep_capacity: {e}") from None
    return value   # a number or None: dj.load checks it


class DeepSeekLM(TemplateLM):
    """lm_eval's ``LM`` over a deepseek_jax model.

    ``pretrained``: a checkpoint directory (loaded with :func:`deepseek_jax.load`, ``dtype``), or
    pass ``model=`` (a loaded :class:`DeepSeekV3`) and ``tokenizer=`` (a
    :class:`deepseek_jax.tokenizer.Tokenizer`) instead. ``batch_size``: sequences per compiled
    pass. ``max_length``: the longest sequence a request may feed the model. ``max_gen_toks``:
    new tokens of a ``generate_until`` request that does not say (default 256, or half of
    ``max_length`` when that is less). lm_eval's ``--device`` and
    ``--max_batch_size`` are accepted and ignored: JAX runs on its default backend (or the mesh
    the model was loaded on).

    With ``pretrained``: ``prefill_attention`` (``plain`` or ``flash``, as ``dj.load`` takes it),
    ``ep_capacity`` (the expert-parallel all-to-all's buffer, a number > 0 or ``worst``, as
    ``--ep-capacity``; default 2), and devices and hosts as ``deepseek-jax generate``'s flags: ``mesh``
    (``"data=2,expert=4"``; default: one device, or all devices on ``expert`` when there is more
    than one process), ``rules`` (``ep_tp``, ``ep_dp``), and for a multi-host run ``coordinator``
    (``HOST:PORT`` of process 0), ``num_processes``, ``process_id`` (or the environment variables
    ``DEEPSEEK_JAX_COORDINATOR``, ``DEEPSEEK_JAX_NUM_PROCESSES``, ``DEEPSEEK_JAX_PROCESS_ID``),
    ``distributed`` (``auto``: JAX finds the cluster), ``heartbeat_timeout`` (30 s). Every process
    runs every request, and lm_eval sees one process of rank 0: see the module's docstring.
    """

    def __init__(self, pretrained: str | os.PathLike[str] | None = None, *, model=None, tokenizer=None,
                 dtype: str = "float32", batch_size: int | str = 8, max_length: int | str | None = None,
                 max_gen_toks: int | str | None = None, seed: int | str = 0, device: Any = None,
                 max_batch_size: Any = None, mesh: str | None = None, rules: str = "ep_tp",
                 coordinator: str | None = None, num_processes: int | str | None = None,
                 process_id: int | str | None = None, distributed: str = "off",
                 heartbeat_timeout: int | str = 30, prefill_attention: str = "plain",
                 ep_capacity: float | str | None = 2.0, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise DeepSeekError(f"DeepSeekLM: unknown argument(s) {', '.join(sorted(unknown))} (expected "
                                f"pretrained, dtype, prefill_attention, ep_capacity, batch_size, max_length, "
                                f"max_gen_toks, seed, "
                                f"{', '.join(_HOST_ARGS)})")
        import jax

        import deepseek_jax as dj
        from deepseek_jax.generate import Generator
        from deepseek_jax.tokenizer import Tokenizer

        if (pretrained is None) == (model is None):
            raise DeepSeekError("DeepSeekLM: give either pretrained=DIR or model= (with tokenizer=)")
        # lm_eval's data parallelism (world_size > 1) deals each rank a slice of the documents; here
        # every process runs every request on the one mesh, so lm_eval sees one process, rank 0.
        self._rank, self._world_size = 0, 1
        hosts = _host_args(mesh=mesh, rules=rules, coordinator=coordinator, num_processes=num_processes,
                           process_id=process_id, distributed=distributed, heartbeat_timeout=heartbeat_timeout)
        self._mesh = None
        if model is None:
            # (what the processes of a multi-host run compare before loading: runtime.init)
            hosts.ckpt = os.fspath(pretrained) if isinstance(pretrained, (str, os.PathLike)) else None
            hosts.dtype, hosts.prefill_attention = str(dtype), prefill_attention
            # (processes with other batches or lengths compile other programs and wait on each
            # other until the distributed service aborts; another seed samples other texts)
            for name, value in (("batch_size", batch_size), ("max_length", max_length),
                                ("max_gen_toks", max_gen_toks), ("seed", seed), ("ep_capacity", ep_capacity)):
                setattr(hosts, name, str(value))
            self._mesh = _init_mesh(hosts)
            model = dj.load(pretrained, dtype=dtype, mesh=self._mesh, rules=hosts.rules,
                            prefill_attention=prefill_attention, ep_capacity=_ep_capacity(ep_capacity))
            if tokenizer is None:
                tokenizer = Tokenizer.from_dir(pretrained)
        else:
            given = [k for k, v in vars(hosts).items() if v != _HOST_DEFAULTS[k]]
            given += ["prefill_attention"] if prefill_attention != "plain" else []
            given += ["ep_capacity"] if ep_capacity != 2.0 else []
            given += ["dtype"] if dtype != "float32" else []   # (a bfloat16 evaluation ran in float32)
            if given:
                raise DeepSeekError(f"DeepSeekLM: {', '.join(given)} apply to pretrained=DIR; a model= runs as "
                                    "it was loaded (on its mesh, after your own jax.distributed.initialize)")
        self._main = jax.process_index() == 0     # the one that shows progress
        if tokenizer is None:
            raise DeepSeekError("DeepSeekLM: model= needs tokenizer= (a deepseek_jax.tokenizer.Tokenizer)")
        if str(batch_size).startswith("auto"):   # lm_eval's "auto" / "auto:N": no search here, the default
            batch_size = 8
        self.batch_size = _positive("batch_size", batch_size)
        limit = model.cfg.max_position_embeddings
        self.max_length = (min(limit, _DEFAULT_MAX_LENGTH) if max_length is None
                           else _positive("max_length", max_length))
        if self.max_length > limit:
            raise DeepSeekError(f"max_length {self.max_length} exceeds the model's max_position_embeddings {limit}")
        self.max_gen_toks = (min(256, max(self.max_length // 2, 1)) if max_gen_toks is None
                             else _positive("max_gen_toks", max_gen_toks))
        self.seed = _integer("seed", seed)
        self.model, self.tokenizer = model, tokenizer
        with self._on_mesh():
            self._generator = Generator(model, tokenizer, max_len=max(self.max_length, 2))

    def _on_mesh(self):
        """The mesh the model was loaded on, for the length of a call (as the commands set it)."""
        import jax
        return jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext()

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """lm_eval's constructor path; ``--model_args`` win over its own ``--batch_size`` etc."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        lm = cls(**arg_dict, **extra)
        _start_loggers()     # (the process index is known now: see _Process0Logger)
        return lm

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- tokenization (TemplateLM's hooks) ------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.model.cfg.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return self.eot_token_id if bos is None else int(bos)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        # (None: bos per the tokenizer config, and none added to text that starts with it)
        return self.tokenizer.encode(string, add_bos=add_special_tokens)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @property
    def tokenizer_name(self) -> str:
        # lm-eval keys its request cache (--cache_requests) by this name: one checkpoint's
        # chat-templated prompts must not be served to another's
        return f"deepseek_jax-{self.tokenizer.fingerprint[:16]}"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # Without a generation prompt (a task's gen_prefix as the last, assistant, message) the
        # text ends with that message, not with the eos the template closes it with: as HF's
        # backend renders it (continue_final_message).
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    # ---- the three request kinds -----------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        from deepseek_jax.scoring import loglikelihood

        # A request feeds its tokens but the last; the model also runs over that one here, so
        # at most max_position_embeddings tokens in all (one context token fewer than HF's
        # backend keeps, and only when max_length is the model's whole length).
        total = min(self.max_length + 1, self.model.cfg.max_position_embeddings)
        pairs = []
        for i, (_, ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                raise DeepSeekError(f"loglikelihood request {i}: the continuation encodes to no tokens")
            ids = np.asarray(ctx + cont)   # checked here, where i is lm_eval's own request number
            if ids.size and (ids.min() < 0 or ids.max() >= self.model.cfg.vocab_size):
                bad = int(ids[(ids < 0) | (ids >= self.model.cfg.vocab_size)][0])
                raise DeepSeekError(f"loglikelihood request {i}: token id {bad} is outside the model's vocab "
                                    f"[0, {self.model.cfg.vocab_size}) (the tokenizer of another model?)")
            keep = total - len(cont)
            if keep < 1:
                raise DeepSeekError(f"loglikelihood request {i}: the continuation alone has {len(cont)} "
                                    f"tokens; at most {total - 1} fit (max_length {self.max_length})")
            pairs.append((ctx[-keep:], cont))
        # By length, in slices of a few batches: the progress bar moves, and each slice still
        # pads little (dj.loglikelihood sorts and buckets within it). The requests of one context
        # (a question's answers) sort together and never straddle two slices, so that the
        # context is computed once for them (dj.loglikelihood's sharing).
        by_ctx: dict[tuple, list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            by_ctx.setdefault(tuple(ctx), []).append(i)
        groups = sorted(by_ctx.values(), key=lambda g: (len(pairs[g[0]][0]) + max(len(pairs[i][1]) for i in g),
                                                        pairs[g[0]][0]))
        step = 16 * self.batch_size
        parts, part = [], []
        for g in groups:
            part += g
            if len(part) >= step:
                parts.append(part)
                part = []
        parts += [part] if part else []
        out: list = [None] * len(pairs)
        with tqdm(total=len(pairs), disable=disable_tqdm or not self._main, desc="deepseek_jax loglikelihood") as bar, \
                self._on_mesh():
            for part in parts:
                for i, r in zip(part, loglikelihood(self.model, [pairs[i] for i in part], batch_size=self.batch_size)):
                    out[i] = (float(r.logprob), bool(r.is_greedy))
                bar.update(len(part))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            ids = self.tok_encode(text, add_special_tokens=False)   # (no tokens: no windows, log p 0)
            # Windows of at most max_length predicted tokens after one of context, fed but for the
            # last: so one fewer than max_length when that is the model's whole length.
            width = min(self.max_length, self.model.cfg.max_position_embeddings - 1)
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=width, context_len=1)):
                windows.append((None, *w))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        total = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            total[i] += lp
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from deepseek_jax.sampling import SamplingParams

        groups: dict[str, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            s = self._gen_settings(i, kwargs)
            settings.append(s)
            groups.setdefault(repr(sorted(s.items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        with self._on_mesh():
            for rows in groups.values():
                s = settings[rows[0]]
                budget = s["max_gen_toks"]
                if budget >= self.max_length:
                    raise DeepSeekError(f"generate_until: max_gen_toks {budget} leaves no room for a context "
                                        f"within max_length {self.max_length}")
                sampling = (SamplingParams(s["temperature"], top_k=s["top_k"], top_p=s["top_p"]) if s["do_sample"]
                            else SamplingParams(0.0))
                for b in range(0, len(rows), self.batch_size):
                    chunk = rows[b:b + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - budget):] for i in chunk]
                    # (first_row: each row draws with its own key, as one call over the group would;
                    # repeats of a sampled request differ, whatever the batch size)
                    kw = dict(max_new_tokens=budget, sampling=sampling, seed=s["seed"], first_row=b)
                    if s["until"]:    # stop strings, matched on the host (generate --stop's path)
                        res = self._generator._generate_text_ids(prompts, stops=s["until"], **kw)
                    else:
                        res = self._generator.generate(prompts, **kw)
                    for i, r in zip(chunk, res):
                        out[i] = r.text if r.text is not None else self.tokenizer.decode(r.output_ids)
        return out

    def _gen_settings(self, i: int, kwargs: Any) -> dict[str, Any]:
        if not isinstance(kwargs, dict):
            raise DeepSeekError(f"generate_until request {i}: expected a dict of generation settings, "
                                f"got {type(kwargs).__name__}")
        bad = sorted(set(kwargs) - _GEN_KEYS - {"max_new_tokens"})
        if bad:
            raise DeepSeekError(f"generate_until request {i}: unsupported generation setting(s) "
                                f"{', '.join(bad)} (supported: {', '.join(sorted(_GEN_KEYS))})")
        until = kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise DeepSeekError(f"generate_until request {i}: 'until' must be a string or a list of strings")
        until = [u for u in until if u]     # (eos ends a row anyway)
        where = f"generate_until request {i}"
        temperature = _number(f"{where}: temperature",
                              kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
        do_sample = bool(kwargs.get("do_sample", temperature > 0)) and temperature > 0
        return {"until": until, "do_sample": do_sample, "temperature": temperature,
                "top_p": _number(f"{where}: top_p", kwargs.get("top_p", 1.0)),
                "top_k": _integer(f"{where}: top_k", kwargs.get("top_k", 0) or 0),
                "max_gen_toks": _positive(f"{where}: max_gen_toks", kwargs.get(
                    "max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks))),
                "seed": _integer(f"{where}: seed", kwargs.get("seed", self.seed))}


def _multi_host_asked(model: Any, model_args: Any) -> bool:
    """Whether ``simple_evaluate``'s arguments run this backend on more than one process."""
    if model != "deepseek_jax":
        return False
    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string
        model_args = simple_parse_args_string(model_args)
    args = model_args if isinstance(model_args, dict) else {}
    return bool(args.get("coordinator") or args.get("distributed") == "auto"
                or os.environ.get("DEEPSEEK_JAX_COORDINATOR"))


def _is_process_0() -> bool:
    """Whether this is JAX's process 0 (or the only process)."""
    import jax
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def _results_on_process_0(simple_evaluate):
    """lm_eval's ``simple_evaluate``, which returns ``None`` on the processes that are not its rank 0
    (lm_eval's command line then prints and writes nothing there): here on every process but
    JAX's process 0, since each reports rank 0 to lm_eval (every process runs every request).

    On more than one process lm_eval's caches are refused: ``use_cache`` (each host would keep
    its own database) and ``cache_requests`` (``--cache_requests true|refresh|delete``). The
    request cache's key names the rank and world size, which are 0 and 1 on every host here, so
    on a shared file system the hosts would write and delete the same files at once (lm_eval's
    delete fails on a file a peer removed first), and on local disks each host could read a
    different, stale cache (the key names neither the seed nor the task's version) and send the
    model other requests than its peers: compiled calls of other shapes, a hang. Having process 0
    write and its peers read after a barrier needs a shared file system too (on local disks the
    peers would build their own requests while process 0 reads its old ones); and the cache saves
    only building the prompts, little beside running a sharded model. So: refused, simply.
    """
    @functools.wraps(simple_evaluate)
    def on_process_0(*args, **kw):
        multi_host = _multi_host_asked(kw.get("model"), kw.get("model_args"))
        if multi_host:
            if kw.get("use_cache"):
                raise DeepSeekError("--use_cache is not supported on more than one process (each host would keep "
                                    "its own cache and could send the model other requests than its peers)")
            if kw.get("cache_requests") or kw.get("delete_requests_cache"):
                raise DeepSeekError("--cache_requests is not supported on more than one process (the hosts would "
                                    "write the same cache files at once, or read different ones and send the model "
                                    "other requests than their peers)")
        else:
            _start_loggers()     # (on several processes: once the model has joined its peers)
        results = simple_evaluate(*args, **kw)
        return results if _is_process_0() else None
    return on_process_0


# Why main() replaces lm_eval's loggers: its command line (lm_eval/_cli/run.py) makes the W&B and
# Trackio loggers, whose constructors start a run, on every process before it calls
# simple_evaluate; but a multi-host run's process index is known only once the model has joined
# jax.distributed, inside simple_evaluate. So it gets _Process0Logger stand-ins, which
# _start_loggers makes into lm_eval's loggers: on one process before the evaluation, on several on
# process 0 only, once the model is loaded (DeepSeekLM.create_from_arg_obj). lm_eval touches them
# only where simple_evaluate returns results: process 0.
_LOGGERS = ("WandbLogger", "TrackioLogger")
_pending_loggers: list[_Process0Logger] = []


class _Process0Logger:
    """Stands for lm_eval's logger ``cls(*args, **kw)``, made by :func:`_start_loggers` on process 0
    only; its attributes are the logger's."""

    def __init__(self, cls: type, *args: Any, **kw: Any) -> None:
        self._make, self._real = functools.partial(cls, *args, **kw), None
        _pending_loggers.append(self)

    def _start(self) -> None:
        if self._real is None:
            if not _is_process_0():
                raise DeepSeekError(f"lm_eval's {self._make.func.__name__} runs on process 0 only")
            self._real = self._make()

    def __getattr__(self, name: str) -> Any:    # (only names __init__ did not set)
        if name in ("_make", "_real"):
            raise AttributeError(name)
        self._start()
        return getattr(self._real, name)


def _start_loggers() -> None:
    """Starts the loggers lm_eval's command line has made so far, on process 0 only."""
    pending = list(_pending_loggers)
    _pending_loggers.clear()
    if _is_process_0():
        for logger in pending:
            logger._start()


def _patch_lm_eval() -> None:
    """What :func:`main` changes in lm_eval (>= 0.4.13, whose command line looks these up when
    it runs): ``simple_evaluate`` (:func:`_results_on_process_0`) and the loggers that start a run
    (:class:`_Process0Logger`); a logger this lm_eval lacks is left out."""
    import importlib.util

    import lm_eval
    import lm_eval.loggers

    if importlib.util.find_spec("lm_eval._cli.run") is None:   # older: names bound at import
        raise DeepSeekError(f"python -m deepseek_jax.harness needs lm_eval>=0.4.13 (found "
                            f"{getattr(lm_eval, '__version__', 'an older one')}): pip install -U lm_eval")
    lm_eval.simple_evaluate = _results_on_process_0(lm_eval.simple_evaluate)
    for name in _LOGGERS:
        cls = getattr(lm_eval.loggers, name, None)
        if cls is not None:
            setattr(lm_eval.loggers, name, functools.partial(_Process0Logger, cls))


def main() -> int:
    """lm_eval's command line with the ``deepseek_jax`` backend registered; errors a user can
    cause end it with one line (exit 2), as the deepseek-jax commands do. On more than one
    process only process 0 prints the results, writes ``--output_path``, pushes to the Hub and
    runs the ``--wandb_args`` / ``--trackio_args`` logger; lm_eval's caches are refused."""
    from lm_eval.__main__ import cli_evaluate

    try:
        _patch_lm_eval()
        cli_evaluate()
    except DeepSeekError as e:
        print(f"deepseek_jax.harness: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":   # `python -m deepseek_jax.harness`: register under the module's real name
    import deepseek_jax.harness
    sys.exit(deepseek_jax.harness.main())
else:
    register_model("deepseek_jax")(DeepSeekLM)
