"""``deepseek-jax demo``: a small trained DeepSeek-V3-shaped model that the package ships, no downloads.

The model (``deepseek_jax/assets/demo_model/``, Hub layout, FP8 128x128 block weights, ~0.6 MB) has
DeepSeek-V3's architecture at toy width: MLA with q-LoRA and YaRN, 1 dense + 2 MoE layers with
group-limited routing (8 routed experts in 4 groups, 2 groups kept, 2 experts per token) and a shared
expert, and one MTP layer. ``deepseek-jax train`` trained it from scratch on ``synthetic:addition``
(1-3 digit operands, chat format, a per-digit byte tokenizer); the converter's ``convert`` + ``export
--dtype fp8`` wrote it. ``tools/make_demo_model.sh`` holds the exact commands. The demo asks it a few
additions that were held out of training (``tasks.py`` holds one problem in ten out) and checks the
answers; ``--speculative mtp`` lets its MTP layer draft for the main model.

Where the model comes from is :func:`demo_checkpoint` alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from deepseek_jax.commands import plain_mode
from deepseek_jax.commands.generate import add_sampling_args, load_generator, sampling_from_args, timing_line
from deepseek_jax.errors import DeepSeekError

#: The shipped model (package data).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
#: The task it was trained on (``tasks.make_dataset`` spec).
DEMO_TASK = "synthetic:addition:digits=3"
#: Held-out problems of that task (never drawn for training: ``tasks._heldout`` is true for each).
DEFAULT_PROMPTS = ("846+483", "50+563", "760+792", "98+96", "7+183", "949+412")

#: Bump when the demo model changes: a ``--dir`` copy with another stamp is replaced.
DEMO_VERSION = 2
_STAMP = "deepseek_jax_demo.json"
_ADDITION = re.compile(r"^\s*(\d{1,18})\s*\+\s*(\d{1,18})\s*$")


def shipped_dir() -> str:
    """The directory of the shipped demo model (an error if the package was installed without it)."""
    if not (SHIPPED_DIR / "config.json").is_file():
        raise DeepSeekError(f"the package's demo model is missing ({SHIPPED_DIR}); rebuild it with "
                            "the source repository's tools/make_demo_model.sh")
    return str(SHIPPED_DIR)


def _stamp() -> dict:
    src = Path(shipped_dir())
    files = {}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name != _STAMP:
            files[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return {"version": DEMO_VERSION, "source": "deepseek_jax/assets/demo_model", "files": files}


def demo_checkpoint(directory: str | None = None) -> str:
    """The demo model as a Hub-layout checkpoint directory (with tokenizer files).

    Without ``directory``: the shipped model's own directory (read-only use). With one: that
    directory, which receives a copy of the shipped model when it is absent or empty (or holds an
    older demo copy), is reused when it holds this copy, and is used as it is when it holds another
    Hub checkpoint with a tokenizer (for example a rebuild by ``tools/make_demo_model.sh``).
    """
    if directory is None:
        return shipped_dir()
    directory = os.path.abspath(directory)
    stamp_path = os.path.join(directory, _STAMP)
    if os.path.isfile(stamp_path):
        try:
            with open(stamp_path, encoding="utf-8") as f:
                if json.load(f) == _stamp():
                    return directory
        except (OSError, ValueError):
            pass
    elif os.path.exists(directory) and not os.path.isdir(directory):
        raise DeepSeekError(f"demo: --dir {directory} is a file, not a directory")
    elif os.path.isdir(directory) and os.listdir(directory):
        if all(os.path.isfile(os.path.join(directory, f)) for f in ("config.json", "tokenizer.json")):
            return directory
        raise DeepSeekError(f"demo: {directory} is not empty and holds no checkpoint with a tokenizer; "
                            "pick another --dir")
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo-copy-", dir=parent)
        os.chmod(tmp, plain_mode(directory, directory=True))
    except OSError as e:
        raise DeepSeekError(f"demo: cannot create a directory under {parent}: {e.strerror or e}") from None
    try:
        stamp = _stamp()
        for name in stamp["files"]:
            shutil.copyfile(os.path.join(shipped_dir(), name), os.path.join(tmp, name))
        with open(os.path.join(tmp, _STAMP), "w", encoding="utf-8") as f:
            json.dump(stamp, f, indent=1)
        if os.path.isdir(directory):
            shutil.rmtree(directory)   # empty, or an older demo copy (it has our stamp)
        os.replace(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise DeepSeekError(f"demo: cannot write the demo checkpoint to {directory}: {e.strerror or e}") from None
        raise
    return directory


def expected_answer(prompt: str) -> str | None:
    """The right answer to an ``a+b`` prompt, else None."""
    m = _ADDITION.match(prompt)
    return str(int(m.group(1)) + int(m.group(2))) if m else None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate with a small built-in DeepSeek-V3-shaped model (no downloads)",
                       description="Runs the small DeepSeek-V3-shaped FP8 model the package ships (trained by "
                                   "`deepseek-jax train` on 1-3 digit addition) on held-out additions, checking "
                                   "its answers and printing tokens/s.")
    p.add_argument("--dir", help="run the demo checkpoint in DIR instead of the shipped one: an empty or absent "
                                 "DIR gets a copy of the shipped model, a DIR holding a checkpoint (e.g. a rebuild "
                                 "by the repository's tools/make_demo_model.sh) is used as it is")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt such as 123+45 instead of the defaults (repeatable)")
    add_sampling_args(p, max_new_tokens=8, temperature=0.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    ckpt = demo_checkpoint(args.dir)
    from deepseek_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(ckpt)
    gen = load_generator(ckpt, args.dtype, tokenizer, args)
    names = [("--prompt" if len(prompts) == 1 else f"--prompt #{i + 1}") if args.prompt else f"prompt {i + 1}"
             for i in range(len(prompts))]
    for name, text in zip(names, prompts):   # bad prompts fail before the model's description is printed
        if not text:
            raise DeepSeekError(f"{name} is empty")
    gen._check_prompts([gen.encode_prompt(t, None) for t in prompts], names)
    from deepseek_jax.config import DeepSeekConfig

    cfg = DeepSeekConfig.from_json_file(ckpt)   # the checkpoint's (the CPU generator dequantizes FP8)
    print(f"demo model: {ckpt}\n  DeepSeek-V3 shape: {cfg.num_hidden_layers} layers ({cfg.num_dense_layers} dense + "
          f"{cfg.num_moe_layers} MoE), hidden {cfg.hidden_size}, MLA (q-LoRA {cfg.q_lora_rank}, latent "
          f"{cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}), {cfg.n_routed_experts} routed experts in {cfg.n_group} "
          f"groups ({cfg.topk_group} kept, {cfg.num_experts_per_tok} per token) + {cfg.n_shared_experts} shared, "
          f"{cfg.num_nextn_predict_layers} MTP layer, {'FP8 128x128 blocks' if cfg.fp8 else 'BF16'}, "
          f"vocab {cfg.vocab_size}\n  trained by `deepseek-jax train` on {DEMO_TASK} "
          f"(the repository's tools/make_demo_model.sh); default prompts are held out of training")
    results = gen.generate_text(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                                speculative=args.speculative)
    right = checked = 0
    for text, r in zip(prompts, results):
        want = expected_answer(text)
        mark = ""
        if want is not None:
            checked += 1
            ok = r.text.strip() == want
            right += ok
            mark = "  [correct]" if ok else f"  [wrong: {want}]"
        print(f"\n>>> {text}\n{r.text}{mark}")
    if checked:
        print(f"\n{right}/{checked} additions right")
    print("\n" + timing_line(gen.last_stats))
    return 0
