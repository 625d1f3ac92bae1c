"""``deepseek-jax train --config CONFIG --data FILE|synthetic:<task> --steps N --out DIR``.

Writes under ``--out``: ``ckpt/`` (Orbax train state every ``--save-every`` steps and at the end),
``metrics.jsonl`` (one line of metrics per step), ``run.json`` (the run's settings; a resumed
run's earlier ones under ``earlier_runs``), ``eval.json`` (held-out metrics, unless
``--eval-batches 0``), ``eval.jsonl`` (one line per evaluation: every ``--eval-every`` steps and
at the end) and ``hub/`` (the final model in the Hub layout with the tokenizer files:
``deepseek-jax score OUT/hub`` works).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

from deepseek_jax import runtime
from deepseek_jax.commands.generate import add_prefill_attention_arg
from deepseek_jax.errors import DeepSeekError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (CE + MTP + balance loss, aux-loss-free routing bias)",
                       description="Trains a DeepSeek-V3-shaped model in float (FP8 quantization of the config "
                                   "is ignored; with --lora-rank, LoRA adapters over --init's weights as loaded, "
                                   "FP8 kept) on a synthetic task or a text file. Writes under --out: ckpt/ "
                                   "(Orbax checkpoints), metrics.jsonl, run.json, eval.json (held-out "
                                   "metrics) and hub/ (the final model in the Hub layout).")
    p.add_argument("--config", help="preset name, config.json or checkpoint directory (model shape)")
    p.add_argument("--init", help="start from the weights of this checkpoint, Hub layout or converted to Orbax "
                                  "(FP8 is dequantized, but kept with --lora-rank) instead of a random "
                                  "initialisation; its config is used if --config is absent")
    p.add_argument("--data", required=True, help="synthetic:addition|reverse|copy[:key=value,...], FILE.jsonl "
                                                 "(chat data: one {\"messages\": [...]} or {\"prompt\", "
                                                 "\"completion\"} object per line; the loss is on the assistant "
                                                 "turns) or a text file (one document per line)")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps (length of the schedule)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the task's or the chat file's longest "
                                               "example rounded up to 8; 128 for text); chat conversations longer "
                                               "than it are left out")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default: steps/10, at most 100)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr*ratio (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip, <= 0 disables (default 1)")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="λ, weight of the MTP loss (default 0.3)")
    p.add_argument("--balance-alpha", type=float, default=1e-4, help="α, weight of the sequence-wise balance "
                                                                     "loss (default 1e-4)")
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="γ, routing-bias update speed; 0 disables "
                                                                  "(default 1e-3)")
    p.add_argument("--remat", action="store_true", help="rematerialise layers in the backward pass (less memory)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="run each batch as K microbatches of --batch/K sequences, gradients summed (weighted by "
                        "their targets: the whole batch's gradient), one update: the activations of a microbatch "
                        "at a time (default 1)")
    p.add_argument("--lora-rank", type=int, metavar="R",
                   help="with --init: fine-tune LoRA adapters of rank R on MLA's projections, the checkpoint's "
                        "weights frozen as loaded (FP8 ones stay FP8; --trainable adds parameters to train); "
                        "OUT/hub gets them merged in")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scale alpha / rank (default alpha = 2 x rank)")
    p.add_argument("--lora-targets", metavar="NAMES",
                   help="comma-separated linear names to adapt (default q_a_proj,q_b_proj,q_proj,"
                        "kv_a_proj_with_mqa,o_proj; gate_proj,up_proj,down_proj add the dense MLPs and shared experts)")
    p.add_argument("--trainable", metavar="REGEX",
                   help="train only the parameters whose name (e.g. moe_layers/self_attn/q_a_proj/weight) "
                        "matches this regular expression, e.g. 'self_attn|norm', or the layers and experts whose "
                        "Hub names match, e.g. 'layers\\.(58|59|60)\\.' or 'experts\\.17\\.'; the others stay as "
                        "loaded (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the data (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/ckpt")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: only at the end)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    add_prefill_attention_arg(p)
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the trained parameters (default float32)")
    p.add_argument("--export-fp8", action="store_true", help="export OUT/hub with 128x128 block-FP8 linear weights")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="held-out batches evaluated at the end, into OUT/eval.json (default 4; 0: none)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also evaluate them every N steps; each evaluation (the final one too) is a line of "
                        "OUT/eval.jsonl (default 0: only at the end)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --init's, when it has tokenizer.json; "
                                       "else the package's tiny tokenizer)")
    p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="shard each batch over the first N devices, parameters replicated (default 1; "
                        "the same as --mesh data=N)")
    runtime.add_args(p, mesh_default="--data-parallel's devices on data; on several processes, every device "
                                     "on data")
    p.set_defaults(func=run)


def _check_same(what: str, saved, now) -> None:
    if saved != now:
        both = isinstance(saved, dict) and isinstance(now, dict)
        diff = [k for k in set(saved) | set(now) if saved.get(k) != now.get(k)] if both else []
        raise DeepSeekError(f"--resume: the checkpoint was made with a different {what}"
                            + (f" (differs in {', '.join(sorted(map(str, diff))[:5])})" if diff else "")
                            + ("" if both else f": {saved!r}, now {now!r}"))


def _init_fingerprint(path: str) -> str:
    """What --resume compares of --init when parameters are frozen (they are not in the run's
    checkpoints, they come from --init): its top-level JSON files (config, index, tokenizer; an
    Orbax checkpoint's manifest of per-tensor checksums) and the names, sizes and a sample of the
    bytes of its safetensors shards. Nothing else: no folder is walked (an OUT inside --init, a
    100k-file Orbax tree) and other files (a README, a log) do not count."""
    import hashlib

    from deepseek_jax.orbax_ckpt import _source_sample
    h, shards = hashlib.sha256(), []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or not os.path.isfile(full) or not name.endswith((".json", ".safetensors")):
            continue
        size = os.path.getsize(full)
        h.update(f"{name}\0{size}\0".encode())
        if name.endswith(".json"):
            with open(full, "rb") as f:
                h.update(f.read())
        else:
            shards.append((name, size))
    h.update(_source_sample(path, shards).encode())
    return h.hexdigest()


def _same_contents(d):
    """A data description as --resume compares it: a file by its contents (sha256), not its path
    (a run's folder and its data may move together)."""
    return {k: v for k, v in d.items() if not (k == "data" and "sha256" in d)} if isinstance(d, dict) else d


def _lora_targets(targets: list[str] | None, cfg) -> list[str]:
    """The linears the adapters go on, as a sorted set (the default resolved for this model: q_proj
    where q_lora_rank is null, else q_a_proj and q_b_proj), as --resume compares them."""
    from deepseek_jax.lora import DEFAULT_TARGETS
    if targets is None:
        skip = {"q_a_proj", "q_b_proj"} if cfg.q_lora_rank is None else {"q_proj"}
        targets = [t for t in DEFAULT_TARGETS if t not in skip]
    return sorted(set(targets))


def _check_numbers(args: argparse.Namespace) -> None:
    """Rejects nonsensical numeric flags before anything is loaded or written."""
    def bad(flag: str, value, want: str) -> DeepSeekError:
        return DeepSeekError(f"{flag} must be {want}, got {value}")

    for flag, value, lo in (("--steps", args.steps, 0), ("--batch", args.batch, 1), ("--warmup", args.warmup, 0),
                            ("--save-every", args.save_every, 0), ("--eval-batches", args.eval_batches, 0),
                            ("--data-parallel", args.data_parallel, 1), ("--grad-accum", args.grad_accum, 1),
                            ("--eval-every", args.eval_every, 0)):
        if value is not None and value < lo:
            raise bad(flag, value, f">= {lo}")
    if args.seq_len is not None and args.seq_len < 4:
        raise bad("--seq-len", args.seq_len, ">= 4")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise bad("--lr", args.lr, "a positive number")
    if not 0 <= args.min_lr_ratio <= 1:
        raise bad("--min-lr-ratio", args.min_lr_ratio, "in [0, 1]")
    for flag, value in (("--weight-decay", args.weight_decay), ("--mtp-weight", args.mtp_weight),
                        ("--balance-alpha", args.balance_alpha), ("--bias-gamma", args.bias_gamma)):
        if not (math.isfinite(value) and value >= 0):
            raise bad(flag, value, "a number >= 0")
    if math.isnan(args.clip):
        raise bad("--clip", args.clip, "a number (<= 0 disables clipping)")
    if args.eval_every and not args.eval_batches:
        raise DeepSeekError("--eval-every needs --eval-batches > 0")
    if args.batch % args.grad_accum:
        raise DeepSeekError(f"--batch {args.batch} must be a multiple of --grad-accum {args.grad_accum}")
    if (args.batch // args.grad_accum) % args.data_parallel:
        raise DeepSeekError(f"--batch {args.batch}" + (f" / --grad-accum {args.grad_accum}" if args.grad_accum > 1
                                                        else "") + f" must be a multiple of --data-parallel "
                            f"{args.data_parallel}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DeepSeekError(f"--out: {args.out} exists and is not a directory")


def run(args: argparse.Namespace) -> int:
    _check_numbers(args)
    if not args.config and not args.init:
        raise DeepSeekError("give --config (model shape) or --init (a checkpoint to start from)")
    if args.lora_rank is not None and not args.init:
        raise DeepSeekError("--lora-rank adapts a trained model: give --init CKPT")
    if args.lora_rank is None and (args.lora_alpha is not None or args.lora_targets is not None):
        raise DeepSeekError("--lora-alpha / --lora-targets need --lora-rank")
    if args.lora_rank is not None and args.param_dtype != "float32":
        raise DeepSeekError("--param-dtype does not apply with --lora-rank: the adapters are float32 and the "
                            "checkpoint's weights keep their dtypes")
    if args.lora_rank is not None and args.config:
        raise DeepSeekError("--config does not apply with --lora-rank: the model is --init's checkpoint as it is")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise DeepSeekError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.trainable is not None:   # a bad pattern fails now, not after loading the model
        import re
        try:
            re.compile(args.trainable)
        except re.error as e:
            raise DeepSeekError(f"--trainable: {args.trainable!r} is not a regular expression ({e})") from None

    if args.mesh and args.data_parallel != 1:
        raise DeepSeekError("give --mesh or --data-parallel, not both (--data-parallel N is --mesh data=N)")
    runtime.check_args(args)

    mesh = _mesh(args)
    n_data = 1 if mesh is None else mesh.shape["data"]
    if (args.batch // args.grad_accum) % n_data:
        raise DeepSeekError(f"--batch {args.batch}" + (f" / --grad-accum {args.grad_accum}" if args.grad_accum > 1
                                                        else "") + f" must be a multiple of the mesh's data axis ({n_data})")

    from deepseek_jax.config import DeepSeekConfig, load_config
    from deepseek_jax.lora import LORA_PATTERN, TARGET_NAMES
    from deepseek_jax.tasks import NothingFits, load_tokenizer, make_dataset
    from deepseek_jax.tokenizer import TINY_TOKENIZER_DIR
    from deepseek_jax.train import TrainConfig

    if args.lora_targets is not None:
        bad = sorted({t.strip() for t in args.lora_targets.split(",")} - set(TARGET_NAMES))
        if bad:
            raise DeepSeekError(f"--lora-targets: no adapter for {', '.join(map(repr, bad))} "
                                f"(choose from {', '.join(TARGET_NAMES)})")
    if args.init and not os.path.isdir(args.init):
        raise DeepSeekError(f"--init: {args.init} is not a checkpoint directory")
    tok_dir = args.tokenizer or (args.init if args.init and os.path.isfile(os.path.join(args.init, "tokenizer.json"))
                                 else TINY_TOKENIZER_DIR)
    tok = load_tokenizer(tok_dir)
    if args.config:
        cfg = load_config(args.config)
    else:
        cfg = DeepSeekConfig.from_json_file(args.init)
    cfg = cfg.replace(fp8=False)
    if cfg.vocab_size < tok.vocab_size:
        if args.init:
            raise DeepSeekError(f"{'--config ' + args.config if args.config else '--init'}: vocab_size "
                                f"{cfg.vocab_size} < the tokenizer's {tok.vocab_size} "
                                f"({tok_dir}): give --tokenizer the checkpoint's tokenizer directory")
        print(f"note: vocab_size {cfg.vocab_size} < the tokenizer's {tok.vocab_size}: training with "
              f"vocab_size {tok.vocab_size}")
        cfg = cfg.replace(vocab_size=tok.vocab_size)

    data = make_dataset(args.data, tok, batch_size=args.batch, seq_len=args.seq_len, seed=args.seed)
    heldout = None
    if args.eval_batches:
        try:
            heldout = make_dataset(args.data, tok, batch_size=args.batch, seq_len=data.seq_len, seed=args.seed + 1,
                                   split="eval")
        except NothingFits as e:   # (training still has data: no held-out evaluation, said so)
            if runtime.is_main():
                print(f"note: {e}: no held-out evaluation", file=sys.stderr)
    if data.seq_len > cfg.max_position_embeddings:
        raise DeepSeekError(f"--seq-len {data.seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    warmup = args.warmup if args.warmup is not None else min(100, args.steps // 10)
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, warmup=warmup, min_lr_ratio=args.min_lr_ratio,
                       weight_decay=args.weight_decay, clip_norm=args.clip, mtp_weight=args.mtp_weight,
                       balance_alpha=args.balance_alpha, bias_gamma=args.bias_gamma, remat=args.remat,
                       grad_accum=args.grad_accum,
                       trainable=args.trainable if args.lora_rank is None
                       else LORA_PATTERN if args.trainable is None else f"{LORA_PATTERN}|{args.trainable}")

    out = os.path.abspath(args.out)
    ckpt_dir = os.path.join(out, "ckpt")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    try:
        runtime.check_shared_dir(out, "--out")
        return _run(args, out, ckpt_dir, cfg, tcfg, data, heldout, tok_dir, mesh)
    except BaseException:
        if created and runtime.is_main() and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)   # a run that failed before writing anything leaves no empty OUT
        raise


def _mesh(args: argparse.Namespace):
    """The run's mesh (``None``: one device). ``--mesh`` as the other commands read it; without
    it, ``--data-parallel N`` devices on ``data`` (on several processes: every device on
    ``data``). Multi-host: every process runs this same command; only process 0 prints (its
    progress bar included) and writes files other than the checkpoints, which Orbax writes from
    every process."""
    import jax

    from deepseek_jax import sharding

    def default(n: int) -> dict[str, int]:
        if jax.process_count() > 1:
            if args.data_parallel != 1:
                raise DeepSeekError("--data-parallel counts this process's devices: on several processes give "
                                    "--mesh (default: every device on data)")
            return {"data": n, "expert": 1, "model": 1}
        if args.data_parallel > n:
            raise DeepSeekError(f"--data-parallel {args.data_parallel}: this process has only {n} device(s)")
        return {"data": args.data_parallel, "expert": 1, "model": 1}

    if args.mesh:
        sharding.parse_mesh(args.mesh, 1 << 30)   # a malformed --mesh fails before any start-up
    mesh = runtime.init(args, default)
    if mesh is not None:
        stack = getattr(args, "exit_stack", None)   # set by cli.main: the mesh lasts as long as the command
        if stack is not None:
            stack.enter_context(jax.set_mesh(mesh))
    runtime.quiet_unless_main(args)
    return mesh


def _run(args, out, ckpt_dir, cfg, tcfg, data, heldout, tok_dir, mesh) -> int:
    """The run proper, once the settings are checked and OUT exists."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from deepseek_jax import api
    from deepseek_jax.lora import add_lora, adapted_names
    from deepseek_jax.train import (Trainer, bf16_snapshot, bf16_unchanged, cast_params, export_hub,
                                    load_float_model)

    existing = Trainer.latest_step(ckpt_dir)
    if args.resume and existing is None:
        raise DeepSeekError(f"--resume: no checkpoint in {ckpt_dir}")
    if not args.resume and existing is not None:
        raise DeepSeekError(f"{ckpt_dir} already holds a checkpoint (step {existing}): pass --resume or "
                            "choose another --out")
    if not args.resume:   # (a new run replaces these: never another run's, nor a user's hub/ folder)
        earlier = [n for n in ("ckpt", "hub", "metrics.jsonl", "eval.json", "eval.jsonl", "run.json")
                   if os.path.lexists(os.path.join(out, n))]
        if earlier:
            raise DeepSeekError(f"--out {out} already holds {', '.join(earlier)} (an earlier run's?): choose another "
                                "--out, or remove them")
    model_cfg = cfg.to_hub_dict()
    describe = data.describe()
    lora_info = None
    if args.lora_rank is not None:
        targets = None if args.lora_targets is None else [t.strip() for t in args.lora_targets.split(",")]
        lora_info = {"rank": args.lora_rank, "alpha": args.lora_alpha if args.lora_alpha is not None
                     else 2.0 * args.lora_rank, "targets": _lora_targets(targets, cfg)}
    dtypes = {"dtype": args.dtype, "param_dtype": args.param_dtype}
    # (frozen parameters are not saved: a resumed run takes them from --init again)
    init_print = _init_fingerprint(args.init) if args.init and tcfg.trainable is not None else None
    keep_frozen = False   # (a run resumed from a checkpoint that holds its frozen weights goes on saving them)
    if args.resume:
        meta = Trainer.read_metadata(ckpt_dir)
        _check_same("model config", meta.get("model_config"), json.loads(json.dumps(model_cfg)))
        keep_frozen = bool(meta.get("frozen_saved", True))
        _check_same("data / batch / seq-len / seed", _same_contents(meta.get("data")), _same_contents(describe))
        saved_lora = meta.get("lora")
        if isinstance(saved_lora, dict):   # (older checkpoints hold "default" or the names as given)
            t = saved_lora.get("targets")
            saved_lora = {**saved_lora, "targets": _lora_targets(None if t == "default" else t, cfg)}
        _check_same("LoRA setting (--lora-rank / --lora-alpha / --lora-targets)", saved_lora, lora_info)
        _check_same("--trainable", (meta.get("train_config") or {}).get("trainable"), tcfg.trainable)
        saved_dtypes = meta.get("dtypes") or {}
        if saved_dtypes.get("param_dtype", args.param_dtype) != args.param_dtype:   # (Orbax would cast the state)
            raise DeepSeekError(f"--resume: the checkpoint's parameters are {saved_dtypes['param_dtype']}: give "
                                f"--param-dtype {saved_dtypes['param_dtype']}")
        was, now = meta.get("train_config") or {}, dataclasses.asdict(tcfg)
        if "clip_norm" in was and (was["clip_norm"] > 0) != (now["clip_norm"] > 0):   # another optimizer state
            on = was["clip_norm"] > 0
            raise DeepSeekError(f"--resume: the checkpoint was trained with gradient clipping {'on' if on else 'off'} "
                                f"(--clip {was['clip_norm']:g}), which its optimizer state depends on: give --clip "
                                + ("> 0" if on else "0"))
        if "init" in meta and meta["init"] != init_print:   # (the frozen weights come from it, not the checkpoint)
            if meta["init"] is None:
                raise DeepSeekError("--resume: this run started from a random initialisation (--config), not --init")
            if init_print is None:
                raise DeepSeekError("--resume: this run's frozen weights come from its --init checkpoint: give it again")
            raise DeepSeekError(f"--resume: --init {args.init} is not the checkpoint this run started from (its "
                                "config, index, tokenizer or weight files differ)")
        saved_step = meta.get("step")
        if isinstance(saved_step, int) and args.steps < saved_step:
            raise DeepSeekError(f"--resume: --steps {args.steps} is below the checkpoint's step {saved_step}")
        changed = [f"{k} {was[k]!r} -> {now[k]!r}" for k in now if k in was and was[k] != now[k]]
        changed += [f"dtype {saved_dtypes['dtype']!r} -> {args.dtype!r}"] * (
            saved_dtypes.get("dtype", args.dtype) != args.dtype)
        if changed:   # allowed (more --steps, a new --lr), but never silently
            print(f"note: --resume with other settings than the checkpoint's: {', '.join(changed)}")

    t0 = time.perf_counter()
    if lora_info is not None:   # the checkpoint as it is (FP8 kept, frozen) plus adapters
        model = api.load(args.init, dtype=args.dtype, prefill_attention=args.prefill_attention, mesh=mesh,
                         rules=args.rules, ep_capacity=args.ep_capacity)
        n = add_lora(model, rank=lora_info["rank"], alpha=lora_info["alpha"], targets=targets, seed=args.seed)
        print(f"LoRA: rank {lora_info['rank']}, alpha {lora_info['alpha']:g}, on {n} weight matrices "
              f"({', '.join(adapted_names(model))})")
    elif args.init:
        prec = api.precision(args.dtype, prefill_attention=args.prefill_attention, ep_capacity=args.ep_capacity)
        model = load_float_model(args.init, prec=prec,
                                 param_dtype=jnp.dtype(args.param_dtype), cfg=cfg, mesh=mesh, rules=args.rules)
    else:   # (on a mesh both are made in their shards: no device or host holds the whole model)
        model = cast_params(api.init_random(cfg, seed=args.seed, dtype=args.dtype, mesh=mesh, rules=args.rules,
                                            prefill_attention=args.prefill_attention, ep_capacity=args.ep_capacity),
                            jnp.dtype(args.param_dtype))
    if lora_info is not None and args.trainable is not None:
        from deepseek_jax.train import trained_predicate
        trained_predicate(args.trainable, model)   # (joined to the adapters' pattern, it always matched)
    trainer = Trainer(model, tcfg, mesh=mesh, rules=args.rules)
    del model
    if tcfg.trainable is not None:
        trained, total = trainer.parameter_counts()
        print(f"training {trained:,} of {total:,} parameters ({100 * trained / total:.1f}%): those matching "
              f"{tcfg.trainable!r}")
    if args.resume:
        trainer.restore(ckpt_dir)
    start = trainer.step
    # (a BF16 export drops updates smaller than bfloat16's steps: said at the end if it did)
    # (with bfloat16 parameters such updates are lost in training itself: nothing to compare)
    snapshot = (bf16_snapshot(trainer.state.params) if lora_info is None and args.param_dtype == "float32"
                else None)
    where = ("1 device" if mesh is None else
             f"{mesh.size} devices (mesh {','.join(f'{k}={v}' for k, v in mesh.shape.items())}"
             + (f", {jax.process_count()} processes)" if jax.process_count() > 1 else ")"))
    print(f"model ready in {time.perf_counter() - t0:.1f}s; {'resuming at' if args.resume else 'starting at'} "
          f"step {start}/{args.steps} on {where}; data {describe['data']} batch {args.batch} x "
          f"{data.seq_len} tokens" + (f" in {args.grad_accum} microbatches" if args.grad_accum > 1 else ""))

    main = runtime.is_main()
    run_info = {"argv": {k: v for k, v in vars(args).items() if k not in ("func", "exit_stack")},
                "train_config": dataclasses.asdict(tcfg), "data": describe, "model_config": model_cfg,
                "start_step": start}
    metrics_path = os.path.join(out, "metrics.jsonl")
    if main:
        run_path = os.path.join(out, "run.json")
        if args.resume:   # this invocation's settings on top; the earlier ones' kept under earlier_runs
            try:
                with open(run_path, encoding="utf-8") as f:
                    before = json.load(f)
            except (OSError, ValueError):
                before = None
            if isinstance(before, dict):
                run_info["earlier_runs"] = list(before.pop("earlier_runs", None) or []) + [before]
        with open(run_path, "w", encoding="utf-8") as f:
            json.dump(run_info, f, indent=2, default=str)
        kept = []
        if args.resume and os.path.exists(metrics_path):
            with open(metrics_path, encoding="utf-8") as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) < start]
        with open(metrics_path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        evals_path = os.path.join(out, "eval.jsonl")
        kept = []
        if args.resume and os.path.exists(evals_path):
            with open(evals_path, encoding="utf-8") as f:
                # (the evaluation at `start` is kept unless it is the final one, which runs again)
                kept = [ln for ln in f if ln.strip() and (json.loads(ln).get("step", 0) < start or (
                    json.loads(ln).get("step", 0) == start and start < args.steps))]
        if kept:
            with open(evals_path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        elif os.path.exists(evals_path):   # (appended to by each evaluation: none, no file)
            os.remove(evals_path)

    meta = {"data": describe, "model_config": model_cfg, "lora": lora_info, "dtypes": dtypes, "init": init_print}

    def save():
        trainer.save(ckpt_dir, meta, frozen=keep_frozen)

    bar = tqdm(total=args.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    pending = None
    t_last, tok_rate, last, held = time.perf_counter(), None, None, ""

    def evaluate() -> dict:
        """Held-out metrics at the current step, appended to OUT/eval.jsonl."""
        nonlocal held
        ev = trainer.evaluate(heldout, args.eval_batches)
        held = f" held-out {ev['loss']:.3f}"
        if main:
            with open(os.path.join(out, "eval.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": trainer.step, **ev}) + "\n")
        return ev

    def flush(item):
        nonlocal t_last, tok_rate, last
        step, metrics = item
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            saved = Trainer.latest_step(ckpt_dir) if os.path.isdir(ckpt_dir) else None
            raise DeepSeekError(f"training diverged at step {step + 1}: loss {m['loss']}, gradient norm "
                                f"{m['grad_norm']}; nothing more saved ("
                                + (f"{ckpt_dir} holds step {saved}" if saved is not None else "no checkpoint")
                                + "); try a lower --lr or a longer --warmup")
        now = time.perf_counter()
        rate = m["tokens"] / max(now - t_last, 1e-9)
        t_last = now
        tok_rate = rate if tok_rate is None or step == start else 0.9 * tok_rate + 0.1 * rate
        last = m
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **m}) + "\n")
        bar.set_postfix_str(f"loss {m['loss']:.3f} mtp {m['mtp_ce']:.3f} {tok_rate:,.0f} tok/s "
                            f"imb {m['imbalance']:.2f}{held}", refresh=False)
        bar.update(1)

    try:
        for step in range(start, args.steps):
            metrics = trainer.train_step(data.batch_at(step))
            if pending is not None:
                flush(pending)
            pending = (step, metrics)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                flush(pending)
                pending = None
                save()
            if heldout is not None and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                if pending is not None:
                    flush(pending)
                    pending = None
                evaluate()
        if pending is not None:
            flush(pending)
    finally:
        bar.close()
    if trainer.step != start or not args.resume:
        save()
    if last is not None:
        print(f"step {trainer.step}: loss {last['loss']:.4f} ce {last['ce']:.4f} mtp {last['mtp_ce']:.4f} "
              f"imbalance {last['imbalance']:.2f}")
    if heldout is not None and args.eval_batches > 0:
        ev = evaluate()
        print("held-out: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if main:
            with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as f:
                json.dump({"step": trainer.step, **ev}, f, indent=2)
    hub_dir = os.path.join(out, "hub")
    if main and os.path.isdir(hub_dir):
        shutil.rmtree(hub_dir)
    # (adapters and FP8 weights are merged tensor by tensor as they are written)
    export_hub(trainer.model(), hub_dir, fp8=args.export_fp8, tokenizer_dir=tok_dir)
    print(f"saved {ckpt_dir} (step {trainer.step}) and {hub_dir} ({'FP8' if args.export_fp8 else 'BF16'})")
    same, n = bf16_unchanged(snapshot, trainer.state.params)
    if same and trainer.step != start:
        coarser = ", and FP8's coarser still" if args.export_fp8 else ""
        print(f"warning: {same} of {n} trained arrays round to their step-{start} values in bfloat16: {hub_dir} "
              f"holds those values (their updates are below bfloat16's resolution{coarser}; {ckpt_dir} keeps "
              "them in float32)", file=sys.stderr)
    return 0
