"""``deepseek-jax score CKPT --ids IN.npy --out OUT.npy``: logits, MTP logits, log-probs, and the
model's internals (hidden states, routing); ``--text-file``: each line's log-prob and perplexity;
``--pairs``: conditional log-likelihoods of (context, continuation) pairs (multiple-choice eval)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Callable

import numpy as np

from deepseek_jax import runtime
from deepseek_jax.commands import json_line, plain_mode, read_lines
from deepseek_jax.commands.generate import add_prefill_attention_arg
from deepseek_jax.errors import DeepSeekError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="logits / log-probs of token ids (the parity interface)",
                       description="Writes float32 logits [B, T, V] of int ids [B, T] (or MTP logits "
                                   "[B, T-1, V] with --mtp).")
    p.add_argument("ckpt", help="checkpoint directory (Hub layout or Orbax)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help=".npy file of int token ids [B, T] (or [T])")
    src.add_argument("--text-file", metavar="FILE",
                     help="score each line of a UTF-8 text file (blank lines skipped), encoded by the checkpoint's "
                          "tokenizer: prints per-line and total log-prob and perplexity (JSON lines with --json); "
                          "lines of different lengths (each up to max_position_embeddings tokens), batched by "
                          "length (--batch-size)")
    src.add_argument("--pairs", metavar="FILE.jsonl",
                     help="conditional log-likelihoods (multiple-choice eval, as lm-evaluation-harness): each "
                          "non-blank line a JSON object with \"context\" and \"continuation\" strings (encoded by "
                          "the checkpoint's tokenizer as lm-evaluation-harness splits them: the context's trailing "
                          "spaces join the continuation, the whole text is encoded and split at the context's "
                          "length) or \"context_ids\" and "
                          "\"continuation_ids\" int lists; prints each line's log p(continuation | context), "
                          "whether greedy decoding gives exactly the continuation, and its tokens, then a total "
                          "(JSON lines with --json)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="with --text-file / --pairs: sequences per batch at most (default 8)")
    p.add_argument("--out", help="file for float32 logits, in .npy format, written at exactly this path (its "
                                 "directory must exist)")
    p.add_argument("--mode", choices=("prefill", "decode"), default="prefill",
                   help="prefill: one pass (naive MLA); decode: one token at a time over the latent cache")
    p.add_argument("--prefill", type=int, default=0,
                   help="with --mode decode only: tokens prefilled in one pass first (default 0)")
    p.add_argument("--mtp", action="store_true", help="write the MTP module's logits [B, T-1, V] (row i predicts i+2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    add_prefill_attention_arg(p)
    p.add_argument("--logprobs", help="file for per-token log-probs [B, T-1] (log p(t_i+1 | t_<=i); with --mtp "
                                      "the MTP module's [B, T-2], log p(t_i+2 | t_<=i+1)), in .npy format, "
                                      "written at exactly this path")
    p.add_argument("--internals", metavar="FILE.npz",
                   help="also write every layer's hidden states and every MoE layer's routing (dj.internals: "
                        "hidden [L+1, B, T, D], final_hidden, experts / expert_weights [Lm, B, T, K], "
                        "expert_scores [Lm, B, T, E], moe_layers) to this .npz, at exactly this path; prefill mode")
    p.add_argument("--attention", action="store_true",
                   help="with --internals: also every layer's attention weights, attention [L, B, H, T, T] "
                        "(L * B * H * T^2 float32: 8 GB for DeepSeek-V3 at T=512)")
    p.add_argument("--json", action="store_true", help="print per-row mean log-prob and perplexity as JSON")
    runtime.add_args(p)
    p.set_defaults(func=run)


def _read_ids(path: str) -> np.ndarray:
    if os.path.isdir(path):
        raise DeepSeekError(f"--ids: {path} is a directory (expected a .npy file of token ids)")
    if not os.path.isfile(path):
        raise DeepSeekError(f"--ids: {path} not found")
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as e:   # numpy's guess for a file that is no .npy: "pickled (object) data"
        raise DeepSeekError(f"--ids: {path} is not a .npy array file ({' '.join(str(e).split())[:120]})") from None
    except (OSError, EOFError) as e:
        raise DeepSeekError(f"--ids: {path} is not a readable .npy file ({e})") from None
    if not isinstance(ids, np.ndarray):   # an .npz archive (an --internals file, say)
        ids.close()
        raise DeepSeekError(f"--ids: {path} is an .npz archive; expected a .npy array of token ids")
    if ids.dtype.kind not in "iu":
        raise DeepSeekError(f"--ids: {path} holds {ids.dtype}, expected integer token ids")
    return ids


def _check_output(flag: str, path: str) -> None:
    """Fails now, not after the compute, when ``path`` cannot be written."""
    if os.path.isdir(path):
        raise DeepSeekError(f"{flag}: {path} is a directory (give a file path)")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise DeepSeekError(f"{flag}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DeepSeekError(f"{flag}: cannot write {path} (permission denied)")


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (links and ``./`` resolved; hard links where both exist)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _write_all(files: list[tuple[str, str, Callable]]) -> None:
    """Writes every ``(flag, path, write(fileobj))`` to a temporary file beside its path, then
    renames them all into place: a failure (disk full, a file size limit) leaves no half-written
    output and every existing file as it was."""
    done: list[tuple[str, str]] = []
    try:
        for flag, path, write in files:
            try:   # (errors name the given path, not the temporary file's)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                                           suffix=".partial")
                done.append((tmp, path, flag))
                os.fchmod(fd, plain_mode(path))
                with os.fdopen(fd, "wb") as f:
                    write(f)
            except OSError as e:
                raise DeepSeekError(f"{flag}: cannot write {path}: {e.strerror or e}") from None
        for tmp, path, flag in done:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise DeepSeekError(f"{flag}: cannot write {path}: {e.strerror or e}") from None
        done = []
    finally:
        for tmp, _, _ in done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _npy(array: np.ndarray) -> Callable:
    """Writes ``array`` in .npy format (into exactly the path given: ``np.save(path)`` would append ``.npy``)."""
    return lambda f: np.save(f, array, allow_pickle=False)


def _npz(arrays: dict) -> Callable:
    """Writes ``arrays`` in .npz format (``np.savez(name)`` would append ``.npz``)."""
    return lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def _tokens(n: int) -> str:
    return f"{n} token" + ("" if n == 1 else "s")


def _check_line_args(args: argparse.Namespace, source: str, prints: str) -> None:
    """The flags of --ids that do not apply to ``source`` (--text-file / --pairs); --batch-size's default."""
    for flag, bad in (("--out", args.out), ("--logprobs", args.logprobs), ("--internals", args.internals),
                      ("--mtp", args.mtp), ("--mode decode", args.mode != "prefill"), ("--prefill", args.prefill),
                      ("--attention", args.attention)):
        if bad:
            raise DeepSeekError(f"{flag} does not apply to {source}: "
                                f"it prints {prints} (--json for JSON lines)")
    args.batch_size = 8 if args.batch_size is None else args.batch_size
    if args.batch_size < 1:
        raise DeepSeekError(f"--batch-size must be >= 1, got {args.batch_size}")
    runtime.check_args(args)


def _run_text(args: argparse.Namespace) -> int:
    """``--text-file``: each line's log-probs (:func:`deepseek_jax.scoring.sequence_logprobs`)."""

    import jax

    import deepseek_jax as dj
    from deepseek_jax.commands.generate import load_tokenizer

    _check_line_args(args, "--text-file", "each line's log-prob and perplexity")
    lines = read_lines(args.text_file, "--text-file")
    tokenizer = load_tokenizer(args.ckpt, required=True)
    seqs = [tokenizer.encode(text) for _, text in lines]
    mesh = runtime.init(args)
    model = dj.load(args.ckpt, dtype=args.dtype, mesh=mesh, rules=args.rules,
                    prefill_attention=args.prefill_attention, ep_capacity=args.ep_capacity)
    limit = model.cfg.max_position_embeddings
    for (lineno, _), s in zip(lines, seqs):
        if len(s) > limit:
            raise DeepSeekError(f"--text-file: line {lineno} is {len(s)} tokens, over the model's "
                                f"max_position_embeddings {limit}")
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        lps = dj.scoring.sequence_logprobs(model, seqs, batch_size=args.batch_size)
    if not runtime.is_main():
        return 0
    total = sum(float(lp.sum(dtype=np.float64)) for lp in lps)
    n = sum(len(lp) for lp in lps)
    for (lineno, _), lp in zip(lines, lps):
        row = {"line": lineno, "tokens_scored": len(lp), "logprob": float(lp.sum(dtype=np.float64)),
               "mean_logprob": float(lp.mean()) if len(lp) else None,
               "perplexity": float(dj.perplexity(lp)) if len(lp) else None}
        print(json_line(row) if args.json else
              f"line {lineno}: {_tokens(len(lp))}" + (f", log p {row['logprob']:.4f}, mean {row['mean_logprob']:.4f}, "
                                                   f"perplexity {row['perplexity']:.4g}" if len(lp) else ""))
    summary = {"lines": len(lps), "tokens_scored": n, "logprob": total, "mean_logprob": total / n if n else None,
               "perplexity": float(np.exp(-total / n)) if n else None}
    print(json_line({"total": summary}) if args.json else
          f"total: {len(lps)} lines, {_tokens(n)}" + (f", log p {total:.4f}, mean {total / n:.4f}, perplexity "
                                                    f"{np.exp(-total / n):.4g}" if n else ""))
    return 0


_PAIR_KEYS = (("context", "continuation"), ("context_ids", "continuation_ids"))


def _parse_pairs(lines: list[tuple[int, str]]) -> list[tuple[int, object, object, bool]]:
    """Each line's ``(line number, context, continuation, is_text)``: strings, or id lists (ints
    checked here, the vocab once the model's config is read)."""
    out = []
    for lineno, line in lines:
        where = f"--pairs: line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DeepSeekError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DeepSeekError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        has = [all(k in obj for k in keys) for keys in _PAIR_KEYS]
        if all(has):
            raise DeepSeekError(f"{where}: give either \"context\"/\"continuation\" or \"context_ids\"/"
                                "\"continuation_ids\", not both")
        if not any(has):
            raise DeepSeekError(f"{where}: expected keys \"context\" and \"continuation\" (strings) or "
                                f"\"context_ids\" and \"continuation_ids\" (int lists), got {sorted(obj)}")
        text = has[0]
        vals = []
        for k in _PAIR_KEYS[0 if text else 1]:
            v = obj[k]
            if text:
                if not isinstance(v, str):
                    raise DeepSeekError(f"{where}: \"{k}\" must be a string, got {type(v).__name__}")
            elif not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                raise DeepSeekError(f"{where}: \"{k}\" must be a list of integer token ids")
            elif not v:
                raise DeepSeekError(f"{where}: \"{k}\" is empty")
            vals.append(v)
        if text and vals[1] == "":
            raise DeepSeekError(f"{where}: \"continuation\" is empty")
        out.append((lineno, vals[0], vals[1], text))
    return out


def _run_pairs(args: argparse.Namespace) -> int:
    """``--pairs``: conditional log-likelihoods (:func:`deepseek_jax.scoring.loglikelihood`)."""

    import jax

    import deepseek_jax as dj
    from deepseek_jax.commands.generate import load_tokenizer

    _check_line_args(args, "--pairs", "each pair's log-likelihood and is_greedy")
    pairs = _parse_pairs(read_lines(args.pairs, "--pairs"))
    tokenizer = None
    if any(text for *_, text in pairs):
        if not os.path.isfile(os.path.join(args.ckpt, "tokenizer.json")) and os.path.isdir(args.ckpt):
            line = next(lineno for lineno, *_, text in pairs if text)
            raise DeepSeekError(f"--pairs: line {line} holds text, but {args.ckpt} has no tokenizer.json "
                                "(give \"context_ids\" / \"continuation_ids\" instead)")
        tokenizer = load_tokenizer(args.ckpt, required=True)
    requests = []
    for lineno, ctx, cont, text in pairs:
        if text:   # (lm-evaluation-harness's split: the log-likelihoods its backend gets)
            try:
                ctx, cont = tokenizer.encode_pair(ctx, cont)
            except DeepSeekError as e:
                raise DeepSeekError(f"--pairs: line {lineno}: {e}") from None
            for k, ids in (("context", ctx), ("continuation", cont)):
                if not ids:
                    raise DeepSeekError(f"--pairs: line {lineno}: \"{k}\" encodes to no tokens")
        requests.append((ctx, cont))
    mesh = runtime.init(args)
    model = dj.load(args.ckpt, dtype=args.dtype, mesh=mesh, rules=args.rules,
                    prefill_attention=args.prefill_attention, ep_capacity=args.ep_capacity)
    V, limit = model.cfg.vocab_size, model.cfg.max_position_embeddings
    for (lineno, *_), (ctx, cont) in zip(pairs, requests):
        for k, ids in (("context", ctx), ("continuation", cont)):
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise DeepSeekError(f"--pairs: line {lineno}: {k} token id {bad[0]} is outside the vocab [0, {V})")
        if len(ctx) + len(cont) > limit:
            raise DeepSeekError(f"--pairs: line {lineno} is {len(ctx) + len(cont)} tokens (context + continuation), "
                                f"over the model's max_position_embeddings {limit}")
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        results = dj.loglikelihood(model, requests, batch_size=args.batch_size)
    if not runtime.is_main():
        return 0
    for (lineno, *_), r in zip(pairs, results):
        row = {"line": lineno, "logprob": r.logprob, "is_greedy": r.is_greedy, "tokens": r.tokens}
        print(json_line(row) if args.json else
              f"line {lineno}: log p {r.logprob:.4f} over {_tokens(r.tokens)}"
              + (", greedy" if r.is_greedy else ", not greedy"))
    n, greedy = len(results), sum(r.is_greedy for r in results)
    total = sum(r.logprob for r in results)
    summary = {"requests": n, "greedy": greedy, "greedy_accuracy": greedy / n, "logprob": total,
               "tokens": sum(r.tokens for r in results)}
    print(json_line({"total": summary}) if args.json else
          f"total: {n} pair{'' if n == 1 else 's'}, {greedy} greedy ({greedy / n:.2%}), log p {total:.4f} over {_tokens(summary['tokens'])}")
    return 0


def run(args: argparse.Namespace) -> int:

    import jax

    import deepseek_jax as dj

    if args.text_file is not None:
        return _run_text(args)
    if args.pairs is not None:
        return _run_pairs(args)
    if args.batch_size is not None:
        raise DeepSeekError("--batch-size applies to --text-file and --pairs (--ids is scored as one batch)")
    if not (args.out or args.logprobs or args.json or args.internals):
        raise DeepSeekError("nothing to write: give --out, --logprobs, --internals or --json")
    outputs = [(flag, path) for flag, path in (("--out", args.out), ("--logprobs", args.logprobs),
                                                ("--internals", args.internals)) if path]
    for flag, path in outputs if runtime.may_be_main(args) else ():   # (process 0 alone writes them)
        _check_output(flag, path)
    for i, (flag, path) in enumerate(outputs):
        for flag2, path2 in outputs[i + 1:]:
            if _same_file(path, path2):
                raise DeepSeekError(f"{flag} and {flag2} are the same file {path}")
        if _same_file(path, args.ids):
            raise DeepSeekError(f"{flag} {path} is the --ids input: it would be overwritten")
    if args.attention and not args.internals:
        raise DeepSeekError("--attention is written into the --internals file: give --internals FILE.npz")
    if args.internals and (args.mtp or args.mode != "prefill"):
        raise DeepSeekError("--internals comes from one prefill pass of the main model: "
                            "--mtp / --mode decode do not apply")
    if args.mtp and (args.mode != "prefill" or args.prefill):
        raise DeepSeekError("--mtp scores in one pass: --mode decode / --prefill do not apply")
    if args.prefill and args.mode != "decode":
        raise DeepSeekError(f"--prefill {args.prefill} needs --mode decode (prefill mode scores in one pass)")
    if args.prefill < 0:
        raise DeepSeekError(f"--prefill must be >= 0, got {args.prefill}")
    runtime.check_args(args)
    ids = _read_ids(args.ids)
    if ids.ndim in (1, 2) and args.prefill > ids.shape[-1]:
        raise DeepSeekError(f"--prefill {args.prefill} exceeds the {ids.shape[-1]} tokens per row of --ids")
    mesh = runtime.init(args)
    model = dj.load(args.ckpt, dtype=args.dtype, mtp=True if args.mtp else None, mesh=mesh, rules=args.rules,
                    prefill_attention=args.prefill_attention, ep_capacity=args.ep_capacity)
    ids = dj.scoring.check_ids(model, ids)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if args.mtp:
            logits = dj.mtp_logits(model, ids)
            offset = 2
        elif args.internals:  # the same pass gives the logits
            ins = dj.internals(model, ids, attention=args.attention)
            logits, offset = ins.logits, 1
        else:
            logits = dj.logits(model, ids, mode=args.mode, prefill=args.prefill)
            offset = 1
    lp = dj.token_logprobs(logits, ids, offset=offset)
    if not runtime.is_main():
        return 0
    files = []
    if args.out:
        files.append(("--out", args.out, _npy(logits.astype(np.float32))))
    if args.logprobs:
        files.append(("--logprobs", args.logprobs, _npy(lp)))
    if args.internals:
        from deepseek_jax.introspect import internals_arrays
        files.append(("--internals", args.internals, _npz(internals_arrays(ins))))
    _write_all(files)
    if args.json:
        for b in range(ids.shape[0]):
            print(json_line({"row": b, "tokens_scored": int(lp.shape[1]),
                         "mean_logprob": float(lp[b].mean()) if lp.shape[1] else None,
                         "perplexity": float(dj.perplexity(lp[b])) if lp.shape[1] else None}))
    return 0
