"""``deepseek-jax generate CKPT (--prompt TEXT | --input-file FILE | --prompt-ids 1,2,3)``.

One prompt (and no ``--json``): the completion streams to stdout as it is generated. Several
prompts (``--input-file``, one per line, or repeated ``--prompt``/``--prompt-ids``) run as one
batch. ``--json`` prints one object per prompt: ``{"prompt_ids", "output_ids", "text",
"finish_reason"}`` (``text`` is null when the checkpoint has no tokenizer). ``--stop TEXT`` and
``--stop-token-id ID`` (both repeatable) end a row like eos does, with finish reason ``"stop"``:
the text is cut before the stop string (never streamed), the stop token id is not output.
``--logprobs`` (needs ``--json``) adds ``"logprobs"``: one float per output id, its log-probability
under the model's raw next-token distribution (temperature 1, no top-k/top-p filtering).
``--top-logprobs K`` (0-20, needs ``--json``; K >= 1 implies ``--logprobs``) adds ``"top_logprobs"``: per
output id, the K most likely ``[id, logprob]`` pairs of its position under that distribution.

The helpers here (sampling flags, tokenizer loading, the timing line) are shared by ``chat``
and ``demo``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from deepseek_jax import runtime
from deepseek_jax.commands import json_line, read_lines, undecodable_byte
from deepseek_jax.errors import DeepSeekError


# ---- shared by generate / chat / demo --------------------------------------------------------
def add_prefill_attention_arg(p: argparse.ArgumentParser) -> None:
    """``--prefill-attention`` (also score, train and plan): ``dj.load(prefill_attention=...)``."""
    p.add_argument("--prefill-attention", choices=("plain", "flash"), default="plain",
                   help="attention among a pass's own tokens: 'plain' (default) holds float32 [heads, T, T] "
                        "scores; 'flash' runs a flash kernel on a GPU (Triton) or TPU (Mosaic), which never "
                        "holds them (long prompts and texts), and on CPU a blocked jnp form holding 512 keys' "
                        "scores at a time; in training their backward holds no more. Not timed on a GPU or "
                        "TPU yet")


def add_sampling_args(p: argparse.ArgumentParser, *, max_new_tokens: int = 200, temperature: float = 0.2) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"new tokens per prompt at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help=f"sampling temperature; below 1e-5 (0 included) means greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same samples")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    add_prefill_attention_arg(p)
    p.add_argument("--speculative", choices=("mtp",), default=None,
                   help="speculative decoding: 'mtp' loads the checkpoint's MTP layer, which drafts one token "
                        "ahead for the main model to verify (greedy output unchanged but for float-rounding "
                        "near-ties; sampling keeps the same distribution)")
    p.add_argument("--prefill-chunk", default="auto", metavar="N",
                   help="prefill prompts in chunks of N tokens (a power of two >= 16: 16, 32, 64...; 'auto' "
                        "(default): only "
                        "when one pass would hold over 2 GiB of attention scores; 'none': always one pass)")


def prefill_chunk_from_args(args: argparse.Namespace | None):
    """``--prefill-chunk`` as :class:`~deepseek_jax.generate.Generator` takes it."""
    text = str(getattr(args, "prefill_chunk", "auto"))
    t = text.strip().lower()
    if t in ("auto", "none"):
        return None if t == "none" else "auto"
    try:
        n = int(t)
    except ValueError:
        n = 0
    if n < 16 or n & (n - 1):
        raise DeepSeekError(f"--prefill-chunk: expected a power of two >= 16 (16, 32, 64, ...), 'auto' or "
                            f"'none', got {text!r}")
    return n


def sampling_from_args(args: argparse.Namespace):
    from deepseek_jax.sampling import SamplingParams

    if args.max_new_tokens < 0:
        raise DeepSeekError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not 0 <= getattr(args, "seed", 0) < 2 ** 32:
        raise DeepSeekError(f"--seed must be in [0, 2**32), got {args.seed}")
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p).validate()


def load_tokenizer(ckpt: str, *, required: bool):
    """The checkpoint's tokenizer; ``None`` when absent and not ``required``."""
    from deepseek_jax.tokenizer import Tokenizer

    if not os.path.isdir(ckpt):
        raise DeepSeekError(f"checkpoint: {ckpt} is not a directory")
    if not required and not os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
        return None
    return Tokenizer.from_dir(ckpt)


def load_generator(ckpt: str, dtype: str, tokenizer, args: argparse.Namespace | None = None,
                   reuse_prefix: bool = False):
    """The engine over the checkpoint; with runtime flags in ``args`` (``--mesh``, multi-host),
    the model is loaded sharded and the rest of the command runs under that mesh.
    ``reuse_prefix``: see :class:`~deepseek_jax.generate.Generator` (chat)."""
    import jax

    import deepseek_jax as dj
    from deepseek_jax.generate import Generator

    prefill_chunk = prefill_chunk_from_args(args)
    mesh = runtime.init(args) if args is not None and hasattr(args, "mesh") else None
    if mesh is not None:
        stack = getattr(args, "exit_stack", None)  # set by cli.main: the mesh lasts as long as the command
        if stack is not None:
            stack.enter_context(jax.set_mesh(mesh))
        else:
            jax.set_mesh(mesh)
        runtime.quiet_unless_main(args)
    rules = getattr(args, "rules", "ep_tp")
    spec = getattr(args, "speculative", None) == "mtp"
    try:
        model = dj.load(ckpt, dtype=dtype, mtp=spec, mesh=mesh, rules=rules,
                        prefill_attention=getattr(args, "prefill_attention", "plain"),
                        ep_capacity=getattr(args, "ep_capacity", 2.0))
    except DeepSeekError as e:
        if spec and "no MTP layer" in str(e):
            raise DeepSeekError(f"--speculative mtp: {ckpt} has no MTP layer to draft with "
                                "(num_nextn_predict_layers = 0 or its tensors are missing)") from None
        raise
    return Generator(model, tokenizer, prefill_chunk=prefill_chunk, reuse_prefix=reuse_prefix,
                     share_prefix=getattr(args, "share_prefix", True))


def total_stats(parts: list):
    """One :class:`~deepseek_jax.generate.GenerationStats` for the calls of a run in batches
    (``batch``: all their prompts; ``shared_prefix``: the most any batch shared;
    ``prefix_cached``: how many batches took it from the generator's kept cache)."""
    from deepseek_jax.generate import GenerationStats

    if len(parts) == 1:
        return parts[0]
    t = GenerationStats(speculative=parts[0].speculative)
    for name in ("batch", "prompt_tokens", "new_tokens", "steps", "compile_s", "prefill_s", "decode_s", "drafted",
                 "accepted"):
        setattr(t, name, sum(getattr(p, name) for p in parts))
    t.shared_prefix = max(p.shared_prefix for p in parts)
    t.prefix_cached = sum(bool(p.prefix_cached) for p in parts)
    return t


def timing_line(stats, batches: int = 1) -> str:
    compile_part = f", compile {stats.compile_s:.1f} s" if stats.compile_s else ""
    spec_part = ""
    if stats.speculative:
        rate = stats.acceptance_rate
        spec_part = (f", speculative {stats.speculative}: {stats.accepted}/{stats.drafted} drafts accepted"
                     + (f" ({rate:.0%})" if rate is not None else "") + f", {stats.steps} steps")
    reuse_part = (f", {stats.reused_prefix} of {stats.prompt_tokens} prompt tokens from the last turn's cache"
                  if stats.reused_prefix else "")
    if stats.shared_prefix and batches == 1:
        reuse_part += (f", {stats.shared_prefix} leading prompt tokens from an earlier batch's kept cache "
                       "(not prefilled)" if stats.prefix_cached else
                       f", {stats.shared_prefix} leading prompt tokens shared by the batch (prefilled once)")
    elif stats.shared_prefix:
        n = int(stats.prefix_cached)
        reuse_part += (f", up to {stats.shared_prefix} leading prompt tokens shared by a batch (prefilled once"
                       + (f", its cache kept for {n} later batch{'es' if n > 1 else ''})" if n else ")"))
    batch_part = f"batch {stats.batch}" if batches == 1 else f"{stats.batch} prompts in {batches} batches"
    return (f"[{stats.new_tokens} tokens in {stats.prefill_s + stats.decode_s:.2f} s: "
            f"{stats.tokens_per_s:,.1f} tokens/s, {batch_part}{compile_part}{spec_part}{reuse_part}]")


# ---- generate ----------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text or token ids from prompts",
                       description="Generates from one prompt (streamed) or a batch of prompts.")
    p.add_argument("ckpt", help="checkpoint directory (Hub layout or Orbax); tokenizer files are read from it")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a text prompt (repeat for a batch)")
    src.add_argument("--input-file", metavar="FILE", help="text prompts, one per line (blank lines skipped)")
    src.add_argument("--prompt-ids", action="append", metavar="1,2,3",
                     help="a prompt as comma-separated token ids, no tokenizer needed (repeat for a batch)")
    tmpl = p.add_mutually_exclusive_group()
    tmpl.add_argument("--chat-template", dest="chat", action="store_const", const=True, default=None,
                      help="wrap text prompts in the tokenizer's chat template (default when it has one)")
    tmpl.add_argument("--raw", dest="chat", action="store_const", const=False,
                      help="encode text prompts as they are (bos per the tokenizer config)")
    add_sampling_args(p)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at eos: always generate --max-new-tokens")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end a prompt's completion at this text, which is cut off (repeatable; needs the "
                        "tokenizer); the token ids up to the one that completed it are kept")
    p.add_argument("--stop-token-id", action="append", type=int, metavar="ID", dest="stop_token_ids",
                   help="end a prompt's completion at this token id, which is not output (repeatable, at most "
                        "16; also with --ignore-eos)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt, no streaming")
    p.add_argument("--logprobs", action="store_true",
                   help="with --json: add \"logprobs\", each output token's log-probability under the model's "
                        "raw next-token distribution (temperature 1, no top-k/top-p)")
    p.add_argument("--top-logprobs", default=None, metavar="K",
                   help="with --json: add \"top_logprobs\", each output token position's K (0-20) most likely "
                        "[id, logprob] pairs under that same distribution, most likely first (K >= 1 implies --logprobs; 0: none)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="prompts per batch (default 32): a longer input runs batch by batch, in order, each "
                        "batch's results printed when it ends; row r draws the random numbers it would in one "
                        "batch (its logits may differ by float rounding)")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="prefill every prompt of a batch whole (default: leading tokens that all prompts share, "
                        "e.g. a system prompt, are prefilled once for the batch, and their cache is kept for the "
                        "next batches that start with them)")
    runtime.add_args(p)
    p.set_defaults(func=run)


def parse_ids(text: str) -> list[int]:
    """``"1,2,3"`` (or ``"1, 2, 3"`` / ``"1 2 3"``) -> ids; an empty item (``"1,,2"``) is an error."""
    if not text.strip():
        raise DeepSeekError("--prompt-ids: empty prompt")
    parts = re.split(r"\s*,\s*|\s+", text.strip())
    if "" in parts:
        raise DeepSeekError(f"--prompt-ids: {text!r} has an empty item (expected comma-separated integers "
                            "such as 1,2,3)")
    if not all(re.fullmatch(r"[+-]?[0-9]+", t, flags=re.ASCII) for t in parts):   # (int() takes "1_0", "٣")
        raise DeepSeekError(f"--prompt-ids: {text!r} is not a comma-separated list of integers")
    return [int(t) for t in parts]


def _encode(tokenizer, texts: list[str], chat: bool | None, names: list[str]) -> list[list[int]]:
    if chat is None:
        chat = tokenizer.has_chat_template
    elif chat and not tokenizer.has_chat_template:
        raise DeepSeekError("--chat-template: the checkpoint's tokenizer_config.json has no chat_template "
                            "(--raw encodes the prompts as they are)")
    out = []
    for name, t in zip(names, texts):
        if not t:
            raise DeepSeekError(f"{name} is empty")
        out.append(tokenizer.encode_chat([{"role": "user", "content": t}]) if chat else tokenizer.encode(t))
    return out


def length_cap_notice(max_len: int, prompts: list[list[int]], max_new_tokens: int,
                      names: list[str] | None = None) -> str | None:
    """A one-line note when the model's max length leaves some prompt fewer than
    ``max_new_tokens`` new tokens (``None`` when it does not); ``names[i]`` names prompt i."""
    rooms = [max_len - len(p) for p in prompts]
    capped = [i for i, r in enumerate(rooms) if 0 < r < max_new_tokens]
    if not capped:
        return None
    if len(prompts) == 1:
        return (f"note: --max-new-tokens {max_new_tokens} capped at {rooms[0]}: the prompt has {len(prompts[0])} "
                f"tokens and the model's max length is {max_len}")
    i = min(capped, key=lambda j: rooms[j])
    return (f"note: --max-new-tokens {max_new_tokens} capped for {len(capped)} of {len(prompts)} prompts by the "
            f"model's max length {max_len} ({names[i] if names else f'prompt {i}'}: at most {rooms[i]} new "
            f"token{'s' if rooms[i] != 1 else ''})")


def check_stop_args(args: argparse.Namespace) -> None:
    """``--stop`` / ``--stop-token-id``: the checks that need no model (the vocab range is the
    generator's)."""
    from deepseek_jax.generate import MAX_STOP_TOKEN_IDS

    if any(s == "" for s in args.stop or ()):
        raise DeepSeekError("--stop: the stop text must not be empty")
    ids = args.stop_token_ids or []
    if any(i < 0 for i in ids):
        raise DeepSeekError(f"--stop-token-id: expected token ids >= 0, got {min(ids)}")
    if len(set(ids)) > MAX_STOP_TOKEN_IDS:
        raise DeepSeekError(f"--stop-token-id: at most {MAX_STOP_TOKEN_IDS} distinct ids, got {len(set(ids))}")


def top_logprobs_from_args(args: argparse.Namespace) -> int:
    """``--top-logprobs K`` as an int (0 when not given); an integer in 0..MAX_TOP_LOGPROBS."""
    from deepseek_jax.generate import MAX_TOP_LOGPROBS

    text = getattr(args, "top_logprobs", None)
    if text is None:
        return 0
    k = int(text) if re.fullmatch(r"\s*\d+\s*", str(text)) else -1
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise DeepSeekError(f"--top-logprobs: expected an integer in 0..{MAX_TOP_LOGPROBS}, got {text!r}")
    return k


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    runtime.check_args(args)
    check_stop_args(args)
    top_logprobs = top_logprobs_from_args(args)
    if args.logprobs and not args.json:
        raise DeepSeekError("--logprobs needs --json (the log-probs are printed in the JSON objects)")
    if top_logprobs and not args.json:
        raise DeepSeekError("--top-logprobs needs --json (the top log-probs are printed in the JSON objects)")
    if args.batch_size < 1:
        raise DeepSeekError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompt_ids and args.chat is not None:
        raise DeepSeekError(f"{'--chat-template' if args.chat else '--raw'} applies to text prompts; --prompt-ids "
                            "are token ids as they are")
    # how errors name a prompt: as the user counts them (1-based, or the input file's line)
    if args.input_file and not (args.prompt_ids or args.prompt):
        lines = read_lines(args.input_file, "--input-file")
        names = [f"--input-file line {n}" for n, _ in lines]
    else:
        flag = "--prompt-ids" if args.prompt_ids else "--prompt"
        n = len(args.prompt_ids or args.prompt)
        names = [flag if n == 1 else f"{flag} #{i + 1}" for i in range(n)]
    if args.prompt_ids:
        prompts = [parse_ids(s) for s in args.prompt_ids]
        tokenizer = load_tokenizer(args.ckpt, required=False)
        if args.stop and tokenizer is None:
            raise DeepSeekError(f"--stop needs the checkpoint's tokenizer: no tokenizer.json in {args.ckpt} "
                                "(use --stop-token-id)")
    else:
        # one prompt per line (ending at \n only: str.splitlines split a prompt at U+2028, a form feed)
        texts = args.prompt if args.prompt else [line for _, line in lines]
        for name, text in zip(names, texts):   # (a rendered template's position was the error's)
            bad = undecodable_byte(text)
            if bad is not None:
                raise DeepSeekError(f"{name} is not UTF-8 text: byte 0x{bad[0]:02x} at character {bad[1]}")
        tokenizer = load_tokenizer(args.ckpt, required=True)
        prompts = _encode(tokenizer, texts, args.chat, names)
    gen = load_generator(args.ckpt, args.dtype, tokenizer, args)
    # (the vocab range, and room beside the config's further eos ids) before any notice
    try:
        gen._check_stop_token_ids(args.stop_token_ids, () if args.ignore_eos else gen.eos_ids[1:])
    except DeepSeekError as e:   # (the library names its argument, stop_token_ids; here it is the flag)
        raise DeepSeekError(f"--stop-token-id: {str(e).removeprefix('stop_token_ids: ')}") from None
    gen._check_prompts(prompts, names)                 # ids, lengths: an error is the only line
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
              stop_at_eos=not args.ignore_eos, speculative=args.speculative, stop_token_ids=args.stop_token_ids,
              logprobs=args.logprobs or top_logprobs > 0, top_logprobs=top_logprobs)
    note = length_cap_notice(gen.max_len, prompts, args.max_new_tokens, names)
    if note:
        print(note, file=sys.stderr)

    if args.stop:   # stop strings: the generator finds them in the text (and streams it)
        def write(row: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        if len(prompts) == 1 and not args.json:   # streamed
            gen._generate_text_ids(prompts, stops=args.stop, stream=write, **kw)
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(timing_line(gen.last_stats), file=sys.stderr)
            return 0
        return _in_batches(args, gen, tokenizer, prompts,
                           lambda batch, first: gen._generate_text_ids(batch, stops=args.stop, first_row=first, **kw))

    if len(prompts) == 1 and not args.json:
        decoder = tokenizer.stream_decoder() if tokenizer else None

        def stream(row: int, ids: list[int]) -> None:
            piece = decoder.feed_many(ids) if decoder else "".join(f"{i} " for i in ids)
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()

        gen.generate(prompts, stream=stream, **kw)
        sys.stdout.write((decoder.flush() if decoder else "") + "\n")
        sys.stdout.flush()
        print(timing_line(gen.last_stats), file=sys.stderr)
        return 0

    def one_batch(batch, first):
        results = gen.generate(batch, first_row=first, **kw)
        for r in results:
            r.text = tokenizer.decode(r.output_ids) if tokenizer else None
        return results

    return _in_batches(args, gen, tokenizer, prompts, one_batch)


def _in_batches(args: argparse.Namespace, gen, tokenizer, prompts, one_batch) -> int:
    """``one_batch(prompts, first_row) -> results`` over ``--batch-size`` prompts at a time,
    each batch's results printed when it ends; then the timing line of them all."""
    stats = []
    for first in range(0, len(prompts), args.batch_size):
        _print_results(args, tokenizer, one_batch(prompts[first:first + args.batch_size], first))
        stats.append(gen.last_stats)
    print(timing_line(total_stats(stats), batches=len(stats)), file=sys.stderr)
    return 0


def _print_results(args: argparse.Namespace, tokenizer, results) -> None:
    for r in results:
        if args.json:
            print(json_line(r.to_json(), ensure_ascii=False))
        else:
            prompt = tokenizer.decode(r.prompt_ids) if tokenizer else " ".join(map(str, r.prompt_ids))
            out = r.text if tokenizer else " ".join(map(str, r.output_ids))
            print(f"Prompt: {prompt}\nCompletion: {out}\n[{r.finish_reason}]\n")
    sys.stdout.flush()
