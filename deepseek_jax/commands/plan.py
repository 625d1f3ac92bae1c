"""``deepseek-jax plan``: per-device memory of a config on a mesh, compiled for fake CPU devices."""

from __future__ import annotations

import argparse
import json
import math

from deepseek_jax.commands.generate import add_prefill_attention_arg
from deepseek_jax.errors import DeepSeekError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device bytes of weights, cache and temporaries on a mesh",
                       description="Builds the abstract model, lowers and compiles the prefill and decode "
                                   "steps for a fake CPU mesh with the same device count, and prints "
                                   "per-device memory and whether it fits the named device.")
    p.add_argument("--config", required=True, help="preset name (configs/) or config.json / checkpoint dir")
    p.add_argument("--mesh", required=True, help="e.g. data=1,expert=16,model=1")
    p.add_argument("--rules", default="ep_tp", choices=("ep_tp", "ep_dp"), help="sharding preset")
    p.add_argument("--dtype", choices=("fp8", "bf16"), default=None,
                   help="weight format (default: the config's: fp8 when it has quantization_config)")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="generate's --dtype: the activations' and the latent cache's dtype (default bfloat16, "
                        "as a deployment runs; generate's own default is float32, twice the cache)")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences decoded together (the generator holds the next power of two of rows, "
                        "a multiple of the mesh's data axis)")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache length per sequence, >= 2 (default: min(4096, the config's max_position_embeddings); "
                        "the generator allocates its length bucket: 4097 -> 6144)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="prefill length, 1..max-len (default: min(max-len, 4096); compiled at its length bucket, as "
                        "generate pads it)")
    p.add_argument("--prefill-batch", type=int, default=1,
                   help="prompts prefilled together, 1..--batch (default 1: a server's one new request; "
                        "generate prefills its whole batch at once: --prefill-batch B)")
    p.add_argument("--prefill-chunk", default="auto", metavar="N",
                   help="the prefill as generate runs it: in chunks of N tokens (a power of two >= 16), 'auto' "
                        "(default: when one pass "
                        "would hold over 2 GiB of attention scores) or 'none'")
    p.add_argument("--device", default="h200",
                   help="memory to fit: h200|h100|h800|a100|b200|mi300x|v5p|v6e|v5e|v4|cpu (default h200)")
    add_prefill_attention_arg(p)   # compiled here, on CPU, in its blocked jnp form
    p.add_argument("--speculative", choices=("mtp",), default=None,
                   help="count the MTP layer's weights and latent cache, as generate --speculative mtp loads and "
                        "allocates them (not counted otherwise; its draft step's temporaries are not compiled)")
    p.add_argument("--no-compile", action="store_true", help="weights and cache only, no compile (1.4 s instead of ~9 s for 671B)")
    t = p.add_argument_group("training (instead of inference)")
    t.add_argument("--train", choices=("full", "lora"), default=None,
                   help="plan one training step as `train` shards it: full (every parameter, --param-dtype; the "
                        "config's FP8 ignored) or lora (adapters over the config's weights, FP8 kept); --batch "
                        "sequences of --seq-len tokens per step")
    t.add_argument("--seq-len", type=int, default=None,
                   help="with --train: tokens per sequence (default: min(4096, max_position_embeddings))")
    t.add_argument("--lora-rank", type=int, default=16, help="with --train lora: adapter rank (default 16)")
    t.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="with --train full: dtype of the trained parameters and their moments (default float32, "
                        "as train's)")
    t.add_argument("--remat", action="store_true", help="with --train: layers rematerialised in the backward "
                   "pass, as train --remat")
    t.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="with --train: --batch in K microbatches, as train --grad-accum (default 1)")
    t.add_argument("--trainable", metavar="REGEX", default=None,
                   help="with --train: train only these parameters (lora: in addition to the adapters), as train's")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_jax.config import load_config

    if args.train is not None:
        if args.speculative:
            raise DeepSeekError("--speculative applies to inference; plan --train counts the MTP layer when the "
                                "config has one")
        return _run_train(args)
    for flag, value, default in (("--seq-len", args.seq_len, None), ("--lora-rank", args.lora_rank, 16),
                                 ("--param-dtype", args.param_dtype, "float32"), ("--trainable", args.trainable, None),
                                 ("--remat", args.remat, False), ("--grad-accum", args.grad_accum, 1)):
        if value != default:
            raise DeepSeekError(f"{flag} applies to training: add --train full|lora")

    for flag, value in (("--batch", args.batch), ("--max-len", args.max_len), ("--prompt-len", args.prompt_len),
                        ("--prefill-batch", args.prefill_batch)):
        if value is not None and value < 1:
            raise DeepSeekError(f"{flag} must be >= 1, got {value}")
    if args.max_len is not None and args.max_len < 2:
        raise DeepSeekError(f"--max-len must be >= 2 (a prompt token and a new one), got {args.max_len}")
    if args.prefill_batch > args.batch:
        raise DeepSeekError(f"--prefill-batch {args.prefill_batch} exceeds --batch {args.batch} (prompts are "
                            "prefilled into the decode batch's rows)")
    if args.prompt_len is not None and args.max_len is not None and args.prompt_len >= args.max_len:
        raise DeepSeekError(f"--prompt-len {args.prompt_len} leaves no room in --max-len {args.max_len} "
                            "(at least one new token)")
    cfg = load_config(args.config)
    if args.dtype:
        cfg = cfg.replace(fp8=args.dtype == "fp8")
    if args.max_len is None:
        args.max_len = min(4096, cfg.max_position_embeddings)
        if args.prompt_len is not None and args.prompt_len >= args.max_len:
            raise DeepSeekError(f"--prompt-len {args.prompt_len} leaves no room in the default --max-len "
                                f"{args.max_len} (at least one new token)")
    elif args.max_len > cfg.max_position_embeddings:
        raise DeepSeekError(f"--max-len {args.max_len} exceeds the config's max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
    sizes = _fake_mesh(args.mesh)
    from deepseek_jax.plan import make_plan
    from deepseek_jax.commands.generate import prefill_chunk_from_args
    chunk = prefill_chunk_from_args(args)
    plan = make_plan(cfg, sizes, rules=args.rules, batch=args.batch, max_len=args.max_len,
                     prompt_len=args.prompt_len, prefill_batch=args.prefill_batch, device=args.device,
                     compile_steps=not args.no_compile, prefill_chunk=chunk,
                     prefill_attention=args.prefill_attention, dtype=args.compute_dtype,
                     mtp=args.speculative == "mtp")
    if args.json:
        print(json.dumps({"mesh": plan.mesh, "weights": plan.weights, "weights_total": plan.weights_total,
                          "cache": plan.cache, "prefill_temp": plan.prefill_temp, "decode_temp": plan.decode_temp,
                          "decode_args": plan.decode_args, "peak": plan.peak, "device": plan.device,
                          "capacity": plan.capacity, "fits": plan.fits, "prefill_tokens": plan.prefill_tokens,
                          "prefill_chunk": plan.prefill_chunk, "prefill_attention": args.prefill_attention,
                          "compute_dtype": args.compute_dtype, "rows": plan.rows, "positions": plan.positions,
                          "compiled": plan.compiled, "mtp": args.speculative == "mtp"}))
    else:
        rows = f" ({plan.rows} rows)" if plan.rows != args.batch else ""
        positions = f" ({plan.positions} positions)" if plan.positions != args.max_len else ""
        print(f"{cfg.num_hidden_layers} layers, {'FP8' if cfg.fp8 else 'BF16'} weights, {args.compute_dtype} compute, "
              f"decode batch {args.batch}{rows}, max-len {args.max_len}{positions}, prefill "
              f"{args.prefill_batch} x {plan.prefill_tokens} tokens"
              f"{f' in chunks of {plan.prefill_chunk}' if plan.prefill_chunk else ''}{_attention(args)}, "
              f"rules {args.rules}; " + ("the MTP layer's weights and cache counted (not its draft step's temporaries)"
                                         if args.speculative else "the MTP layer not counted (--speculative mtp)"))
        print(plan.table())
    return 0


def _run_train(args: argparse.Namespace) -> int:
    """``plan --train full|lora``: :func:`deepseek_jax.plan.make_train_plan`."""
    from deepseek_jax.config import load_config

    for flag, value, default in (("--max-len", args.max_len, None), ("--prompt-len", args.prompt_len, None),
                                 ("--compute-dtype", args.compute_dtype, "bfloat16"),
                                 ("--prefill-batch", args.prefill_batch, 1), ("--prefill-chunk", args.prefill_chunk,
                                                                              "auto")):
        if value != default:
            raise DeepSeekError(f"{flag} applies to inference plans, not --train (use --seq-len and --batch)")
    for flag, value in (("--batch", args.batch), ("--lora-rank", args.lora_rank), ("--grad-accum", args.grad_accum)):
        if value is not None and value < 1:
            raise DeepSeekError(f"{flag} must be >= 1, got {value}")
    if args.seq_len is not None and args.seq_len < 4:   # (as train takes it)
        raise DeepSeekError(f"--seq-len must be >= 4, got {args.seq_len}")
    if args.train == "full" and args.lora_rank != 16:   # (the flags a --train mode ignores: refused, not ignored)
        raise DeepSeekError("--lora-rank applies to --train lora")
    if args.train == "lora" and args.param_dtype != "float32":
        raise DeepSeekError("--param-dtype applies to --train full (LoRA's adapters are float32)")
    if args.batch % args.grad_accum:
        raise DeepSeekError(f"--batch {args.batch} must be a multiple of --grad-accum {args.grad_accum}")
    if args.trainable is not None:
        import re
        try:
            re.compile(args.trainable)
        except re.error as e:
            raise DeepSeekError(f"--trainable: {args.trainable!r} is not a regular expression ({e})") from None
    cfg = load_config(args.config)
    if args.dtype:
        cfg = cfg.replace(fp8=args.dtype == "fp8")
    seq = args.seq_len or min(4096, cfg.max_position_embeddings)
    sizes = _fake_mesh(args.mesh)
    from deepseek_jax.plan import make_train_plan
    plan = make_train_plan(cfg, sizes, mode=args.train, rules=args.rules, batch=args.batch, seq_len=seq,
                           lora_rank=args.lora_rank, trainable=args.trainable, param_dtype=args.param_dtype,
                           remat=args.remat, grad_accum=args.grad_accum, device=args.device,
                           compile_steps=not args.no_compile, prefill_attention=args.prefill_attention)
    if args.json:
        print(json.dumps({**plan.to_json(), "prefill_attention": args.prefill_attention}))
    else:
        weights = "FP8 (frozen) + LoRA" if args.train == "lora" and cfg.fp8 else (
            args.param_dtype if args.train == "full" else "BF16 (frozen) + LoRA")
        micro = f" in {args.grad_accum} microbatches" if args.grad_accum > 1 else ""
        print(f"{cfg.num_hidden_layers} layers, training {args.train}: {weights}, {args.batch} x {seq} tokens per "
              f"step{micro}{', remat' if args.remat else ''}{_attention(args)}, rules {args.rules}")
        print(plan.table())
    return 0


def _attention(args: argparse.Namespace) -> str:
    return ", flash attention (blocked jnp form)" if args.prefill_attention == "flash" else ""


MAX_PLAN_DEVICES = 8192   # (100,000 fake CPU devices took jax's start-up minutes)


def _fake_mesh(text: str) -> dict[str, int]:
    """The ``--mesh`` sizes, with this process set up to fake that many CPU devices (possible only
    before jax's backends start; else the plan functions check the count)."""
    import jax

    from deepseek_jax.sharding import MESH_AXES, parse_mesh

    if not text.strip():   # (parse_mesh would read it as "every device", here 2^30 of them)
        raise DeepSeekError("--mesh is empty: give the sizes, e.g. expert=8,model=2")
    sizes = parse_mesh(text, 1 << 30)
    n = math.prod(sizes[a] for a in MESH_AXES)
    if n > MAX_PLAN_DEVICES:
        raise DeepSeekError(f"--mesh: {text} is {n} devices; a plan fakes one CPU device per device, at most "
                            f"{MAX_PLAN_DEVICES}")
    try:   # (never fewer devices than asked for already: a caller's JAX_NUM_CPU_DEVICES=8 stays 8)
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", max(n, int(getattr(jax.config, "jax_num_cpu_devices", -1) or -1)))
    except Exception:  # noqa: BLE001 - already initialised
        pass
    return sizes
