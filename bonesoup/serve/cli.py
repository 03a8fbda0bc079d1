"""``bonesoup serve`` on the command line: loading the soup, running uvicorn, the embedded default.

    bonesoup serve                                   # embedded default: tiny checkpoints made in code
    bonesoup serve --backbones B1 B2 --sft S --beta 0.7 [--model-dir D] [--port 8000] [--api-key KEY]
    bonesoup serve --adapters A1 A2 --sft S --beta 0.7    # LoRA backbones: every preference in one batch
    bonesoup serve --lora-rank 8                          # embedded default with tiny LoRA backbones
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from bonesoup.merge.methods import get_merge_method, merge_method_names
from bonesoup.serve.protocol import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS_LIMIT

__all__ = ["SERVE_DEMO_DIR", "ServerThread", "add_serve_parser", "build_embedded_adapters", "build_embedded_default",
           "build_from_args", "cmd_serve", "load_adapter_soup", "load_live_soup", "main"]

log = logging.getLogger("bonesoup.serve")

SERVE_DEMO_DIR = Path("out") / "serve-demo"


class ServerThread:
    """Run an ASGI app with uvicorn on ``host`` in a background thread (port 0: an ephemeral port).

    >>> with ServerThread(app) as srv:          # doctest: +SKIP
    ...     urllib.request.urlopen(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="bonesoup-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_live_soup(backbones: Sequence, *, beta: float | None, sft=None, model_dir=None, method: str = "bone",
                   device: str | None = None, dtype: str | None = None):
    """Load the live model (``model_dir``, default the first backbone) and build a LiveSoup over it.

    Returns ``(soup, model, tokenizer)``; the tokenizer is left-padding, with
    a pad token (the EOS token when the checkpoint has none).
    """
    from transformers import AutoModelForCausalLM

    from bonesoup.merge.checkpoint import parse_dtype
    from bonesoup.merge.live import LiveSoup

    model_dir = Path(model_dir if model_dir is not None else backbones[0])
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = parse_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    tokenizer = _tokenizer_from([model_dir, *backbones])
    soup = LiveSoup(model, list(backbones), beta=beta, sft=sft, method=method)
    return soup, model, tokenizer


def _tokenizer_from(dirs):
    from transformers import AutoTokenizer

    tok_dir = next((d for d in dirs if isinstance(d, (str, Path))
                    and any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))), None)
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer files in {', '.join(str(d) for d in dirs)}")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_adapter_soup(adapters: Sequence, *, sft, beta: float | None, method: str = "bone",
                      device: str | None = None, dtype: str | None = None):
    """Load the SFT model from ``sft`` and install an AdapterSoup over the LoRA ``adapters`` on it.

    Returns ``(soup, model, tokenizer)`` like :func:`load_live_soup`; the
    adapters are checked against each other and against ``sft`` (their
    recorded base), naming the directory that disagrees.
    """
    from transformers import AutoModelForCausalLM

    from bonesoup.merge.adapter_soup import AdapterSoup
    from bonesoup.merge.checkpoint import parse_dtype
    from bonesoup.merge.lora import load_adapters

    if sft is None:
        raise ValueError("--adapters needs --sft (the base model the adapters were trained on)")
    loaded = load_adapters(list(adapters), sft=sft)
    kwargs = {} if dtype is None else {"dtype": parse_dtype(dtype)}
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(sft, **kwargs).to(device).eval()
    tokenizer = _tokenizer_from([sft, *adapters])
    return AdapterSoup(model, loaded, beta=beta, method=method), model, tokenizer


def build_embedded_adapters(workdir: str | os.PathLike = SERVE_DEMO_DIR, *, n: int = 2, rank: int = 8,
                            seed: int = 0, delta: float = 0.3):
    """Tiny GPT-2 SFT + ``n`` LoRA backbones of rank ``rank`` made in code; returns (sft, adapter dirs).

    Each adapter targets every linear layer of the blocks (``c_attn``,
    ``c_proj``, ``c_fc``; Conv1D, so ``fan_in_fan_out``) with seeded random
    ``A`` and ``B`` whose delta ``s B A`` has entries of standard deviation
    ``delta`` (0.3, as the full-weight default's, so preferences visibly
    differ). Saved in peft's format (``peft.PeftModel.from_pretrained``
    loads them), ``base_model_name_or_path`` = the SFT directory.
    """
    import transformers

    from bonesoup.tasks.tiny_models import make_tiny_backbones, random_gpt2_adapters

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank must be an integer >= 1, got {rank!r}")
    transformers.logging.disable_progress_bar()
    root = Path(workdir) / f"lora-n{n}-r{rank}"
    sft, _ = make_tiny_backbones(root, 0, seed=seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(sft)
    adapters = random_gpt2_adapters(model, n, rank, seed=seed, delta=delta, base=str(sft))
    dirs = [a.save(root / f"adapter-{j}", force=True) for j, a in enumerate(adapters)]
    return sft, dirs


def build_embedded_default(workdir: str | os.PathLike = SERVE_DEMO_DIR, *, n: int = 2, seed: int = 0,
                           delta: float = 0.3):
    """Tiny GPT-2 SFT + ``n`` backbones made in code under ``workdir``; returns (sft, backbones).

    ``delta`` = 0.3 (not tiny_models' 0.02) so that different preferences
    visibly generate different text.
    """
    from bonesoup.tasks.tiny_models import make_tiny_backbones

    import transformers

    transformers.logging.disable_progress_bar()
    return make_tiny_backbones(Path(workdir) / f"inputs-n{n}", n, seed=seed, delta=delta)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a ``bonesoup`` sub-command parser; its ``func`` is :func:`cmd_serve`."""
    p = subparsers.add_parser(
        "serve",
        help="serve OpenAI-compatible completions with live re-merging (no directories: the embedded default)",
        description="Serve /v1/completions, /v1/preference, /v1/models, /health and /metrics. Each request may "
        "carry a preference; the server re-merges the live weights in place (LiveSoup) when the next request's "
        "preference differs from the current one. With no --backbones it builds tiny checkpoints in code (under "
        f"--workdir, default {SERVE_DEMO_DIR}) and serves those (n=2, beta 0.7). With LoRA backbones "
        "(--adapters, or --lora-rank for the embedded default) nothing is re-merged: requests of every "
        "preference decode in one batch, each row at its own mixture of the adapters.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--backbones", nargs="+", type=Path, metavar="DIR", help="backbone checkpoint directories")
    src.add_argument("--adapters", nargs="+", type=Path, metavar="DIR", help="LoRA backbones: peft adapter "
                     "directories on the --sft model (per-row preferences in one batch, no re-merge)")
    src.add_argument("--lora-rank", type=int, metavar="R", help="embedded default with LoRA backbones of rank R "
                     "(tiny adapters made in code under --workdir)")
    p.add_argument("--model-dir", type=Path, help="checkpoint giving the live model's architecture, config and "
                   "tokenizer (default: the first backbone)")
    p.add_argument("--sft", type=Path, help="SFT checkpoint directory (needed for alpha != 0; with --adapters: the "
                   "base model the adapters apply to)")
    p.add_argument("--beta", type=float, help="backbone mixing strength in (0.5, 1) (method bone; demo: 0.7)")
    p.add_argument("--method", choices=merge_method_names(), default="bone")
    p.add_argument("--preference", type=float, nargs="+", help="initial preference (default: uniform)")
    p.add_argument("--alpha", type=float, default=0.0, help="initial alpha, and the alpha of requests that give "
                   "a preference but no alpha (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default: env BONESOUP_API_KEY)")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help=f"largest max_tokens accepted (default {DEFAULT_MAX_TOKENS_LIMIT})")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted, in tokens (default: the "
                   "model's context length - 1); prompt + max_tokens must also fit the context")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES}); 413 above it")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="prompts per guided_generate call for batched (unseeded sampled) prompts")
    p.add_argument("--batch-greedy", action=argparse.BooleanOptionalAction, default=None,
                   help="batch greedy and seeded prompts too (faster; their text may then depend on the batch in "
                   "near-ties below 1e-4 in logit). Default: off for full-weight backbones, on for adapters")
    p.add_argument("--batch-wait-ms", type=float, help="how long a round waits for requests still being parsed "
                   "and tokenised to join its batch (default: 20 with adapters, 0 with full-weight backbones)")
    p.add_argument("--served-model-name", default="bonesoup", help="the model id clients send and see")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="live model dtype (default: as saved)")
    p.add_argument("--workdir", type=Path, default=SERVE_DEMO_DIR, help="embedded default only: where the tiny "
                   "checkpoints go")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    v = p.add_argument_group("vLLM engine", "--engine vllm serves the same API on vLLM's AsyncLLM (needs vLLM: "
                             "scripts/setup-vllm-env.sh). Adapter backbones: a mixture adapter per request's "
                             "preference, one batch; full checkpoints: pause, re-merge in place, resume (needs --sft). "
                             "No --backbones: a tiny Qwen2 and 2 LoRA backbones made in code.")
    v.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="hf (default: transformers, no vLLM) or vllm")
    v.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM's tensor parallelism (default 1)")
    v.add_argument("--max-loras", type=int, default=16, help="adapter backbones: mixture adapters (distinct "
                   "preferences) vLLM holds and batches at once (default 16)")
    v.add_argument("--max-model-len", type=int, help="vLLM's context length (default: the model's)")
    p.set_defaults(func=cmd_serve)
    return p


def build_from_args(args):
    """``(app, soup, api_key)`` from parsed ``serve`` arguments; raises ValueError on bad arguments."""
    from bonesoup.merge.adapter_merge import is_adapter_dir

    adapters = getattr(args, "adapters", None)
    lora_rank = getattr(args, "lora_rank", None)
    full = args.backbones
    if full and any(is_adapter_dir(b) for b in full):
        # Adapter directories are told apart by their adapter_config.json, as `bonesoup merge` and
        # --engine vllm do: --backbones A1 A2 means --adapters A1 A2.
        if not all(is_adapter_dir(b) for b in full):
            raise ValueError("--backbones mixes LoRA adapter directories (with adapter_config.json) and full "
                             "checkpoints; give all of one kind")
        adapters, full = full, None
    if getattr(args, "engine", "hf") == "vllm":
        from bonesoup.serve.vllm_engine import build_vllm_app

        if lora_rank is not None:
            raise ValueError("--lora-rank makes the hf engine's embedded default; --engine vllm's embedded default "
                             "has its own tiny Qwen2 adapters (or give --backbones / --adapters)")
        # The vLLM engine reads --backbones and tells adapters apart itself.
        return build_vllm_app(argparse.Namespace(**{**vars(args), "backbones": adapters or full}))
    from bonesoup.serve.app import create_app

    if full or adapters:
        if get_merge_method(args.method).needs_beta and args.beta is None:
            raise ValueError(f"--beta is required for --method {args.method}")
        backbones, sft, beta, model_dir = full or adapters, args.sft, args.beta, args.model_dir
        if adapters and model_dir is not None:
            raise ValueError("--model-dir applies to --backbones; with --adapters the model is --sft")
        for d in [*backbones, *([sft] if sft else []), *([model_dir] if model_dir else [])]:
            if not Path(d).is_dir():
                raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    elif lora_rank is not None:
        if args.model_dir is not None or args.sft is not None:
            raise ValueError("--model-dir and --sft need --backbones or --adapters (--lora-rank alone: the embedded "
                             "default with LoRA backbones)")
        sft, backbones = build_embedded_adapters(args.workdir, rank=lora_rank)
        adapters, model_dir = backbones, None
        beta = 0.7 if args.beta is None else args.beta
        log.warning("serving the embedded default: tiny GPT-2 with rank-%d LoRA backbones made in code under %s",
                    lora_rank, args.workdir)
    else:
        if args.model_dir is not None or args.sft is not None:
            raise ValueError("--model-dir and --sft need --backbones (no --backbones: the embedded default)")
        sft, backbones = build_embedded_default(args.workdir)
        beta = 0.7 if args.beta is None else args.beta
        model_dir = sft
        log.warning("serving the embedded default: tiny GPT-2 backbones made in code under %s", args.workdir)
    if args.max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}")
    if adapters:
        soup, model, tokenizer = load_adapter_soup(backbones, sft=sft, beta=beta, method=args.method,
                                                   device=args.device, dtype=args.dtype)
        pref = args.preference or [1.0 / soup.n] * soup.n
        soup.set_preference(pref, alpha=args.alpha)
        log.warning("LoRA backbones (ranks %s): default preference %s alpha %s; no re-merge",
                    [a.rank for a in soup.adapters], soup.preference, soup.alpha)
    else:
        soup, model, tokenizer = load_live_soup(backbones, beta=beta, sft=sft, model_dir=model_dir,
                                                method=args.method, device=args.device, dtype=args.dtype)
        pref = args.preference or [1.0 / soup.n] * soup.n
        info = soup.set_preference(pref, alpha=args.alpha)
        log.warning("initial weights: preference %s alpha %s (version %d, %.1f ms)", info.preference, info.alpha,
                    info.version, info.seconds * 1e3)
    api_key = args.api_key or os.environ.get("BONESOUP_API_KEY") or None
    app = create_app(soup, model, tokenizer, api_key=api_key, max_tokens_limit=args.max_tokens_limit,
                     model_name=args.served_model_name, default_alpha=args.alpha, batch_greedy=args.batch_greedy,
                     max_batch_size=args.max_batch_size, max_prompt_tokens=args.max_prompt_tokens,
                     max_body_bytes=args.max_body_bytes, backbones=backbones, sft=sft,
                     batch_wait_s=None if args.batch_wait_ms is None else args.batch_wait_ms / 1e3)
    return app, soup, api_key


def cmd_serve(args) -> int:
    """Run the server until interrupted."""
    import uvicorn

    logging.getLogger("bonesoup").setLevel(getattr(logging, args.log_level.upper()))
    app, soup, api_key = build_from_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("binding %s without an API key: anyone who can reach it can generate and re-merge", args.host)
    print(f"bonesoup serve: {soup!r} on http://{args.host}:{args.port} (auth: {'on' if api_key else 'off'})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bonesoup.serve ...``: the same as ``bonesoup serve ...``."""
    import sys

    parser = argparse.ArgumentParser(prog="bonesoup")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"bonesoup serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
