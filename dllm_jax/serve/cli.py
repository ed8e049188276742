"""`dllm-jax serve`: the OpenAI-compatible server (FastAPI + uvicorn) over one model folder.

Contract:

    dllm-jax serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--mesh data=2,...]
        [--max-batch 8] [--bucket 16] [--max-queue 256] [--request-timeout 600]
        [--batch-wait-ms 0] [--served-model-name NAME]
        [generation options as in `dllm-jax generate`: they set the server's defaults for
         fields a request leaves out: --gen-length --block-length --steps --controller
         --threshold ... --temperature --cfg --cache --refresh-every --seed]

Continuous batching (see `engine.py`): one scheduler thread decodes block by block; between
two blocks finished rows leave and queued requests with the same settings take their slots.
`GET /` serves the demo page. SIGTERM / Ctrl-C: stop accepting connections, let running
requests finish (30 s grace), answer queued ones with a 503 error, exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys

from dllm_jax import draft_cli
from dllm_jax.cli_options import (DEFAULT_GEN_LENGTH, UsageError, add_generation_options,
                                  add_quantize_option, check_quantize, decode_settings,
                                  given_controller_options)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder from `dllm-jax convert` (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                       "127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,model=2 (default: one device)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="slots of the continuous batch (default 8): requests join it between "
                        "two blocks")
    p.add_argument("--bucket", type=int, default=16,
                   help="prompt widths are padded to bucket * 2^k (default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="most rows waiting; more requests get 429 (default 256)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before a request is answered 504 (default 600)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="hold a new, not-full batch this long for more requests (default 0)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the model folder's name)")
    p.add_argument("--dtype", default=None, help="params dtype (default: as stored)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    add_generation_options(p)
    add_quantize_option(p)
    draft_cli.add_argument(p, " (used by the requests whose controller is simsd; loaded with "
                              "--dtype on --mesh)")


def serve_defaults(args: argparse.Namespace, model_dir: str):  # -> ServeDefaults
    """The server's defaults from the generation flags (checked as `generate` checks them)."""
    from dllm_jax.serve.protocol import ServeDefaults

    decode_settings(args, model_dir)  # UsageError for a bad flag, as in `generate`
    check_quantize(args.quantize)
    if args.refresh_scope != "full" or args.refresh_blocks != 1:
        raise UsageError("--refresh-scope / --refresh-blocks are options of generate, batch "
                         "and bench; the server's block-level decode refreshes the full "
                         "sequence at every block start: drop them.")
    return ServeDefaults(
        gen_length=args.gen_length or DEFAULT_GEN_LENGTH, block_length=args.block_length,
        steps=args.steps, temperature=args.temperature, cfg=args.cfg, cache=args.cache,
        refresh_every=args.refresh_every, seed=args.seed, controller=args.controller,
        controller_options=tuple(sorted(given_controller_options(args).items())))


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dllm_jax.serve.app import create_app
    except ImportError as e:
        raise UsageError(f"`dllm-jax serve` needs the serve extra ({e.name} is missing); "
                         f"pip install 'dllm-jax[serve]'.") from None
    from dllm_jax import session

    if args.chat:
        raise UsageError("--chat does not apply to serve: /v1/chat/completions applies the "
                         "chat template, /v1/completions does not.")
    for flag, value in (("--max-batch", args.max_batch), ("--bucket", args.bucket),
                        ("--max-queue", args.max_queue)):
        if value <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {value}.")
    if args.request_timeout <= 0 or args.batch_wait_ms < 0:
        raise UsageError("--request-timeout must be > 0 and --batch-wait-ms >= 0.")
    model_dir = session.resolve_model_dir(args.model)
    defaults = serve_defaults(args, str(model_dir))
    mesh = None
    if args.mesh is not None:
        from dllm_jax import sharding as S

        try:
            mesh = S.make_mesh(args.mesh)
        except S.ShardingError as e:
            raise UsageError(f"--mesh: {e}") from None
    draft_dir = None if args.draft_model is None else draft_cli.resolve(args.draft_model)
    sess = session.load(model_dir, dtype=args.dtype, mesh=mesh, quantize=args.quantize)
    draft = None if draft_dir is None else draft_cli.load(draft_dir, dtype=args.dtype, mesh=mesh)
    app = create_app(sess, served_model_name=args.served_model_name, defaults=defaults,
                     draft=draft,
                     max_batch=args.max_batch, bucket=args.bucket, max_queue=args.max_queue,
                     request_timeout=args.request_timeout,
                     batch_wait=args.batch_wait_ms / 1000.0)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=30, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn catches SIGTERM / SIGINT, shuts down gracefully and then re-raises the signal
    # with the handler found before it: make that one a no-op, so the command exits 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if not server.started:
        print("error: the server did not start (see the log above).", file=sys.stderr)
        return 1
    return 0
