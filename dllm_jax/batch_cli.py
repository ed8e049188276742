"""`dllm-jax batch`: decode a JSONL file of prompts, restartably, on one device, a mesh, or a pod.

Contract:

    dllm-jax batch --model DIR --input prompts.jsonl --output answers.jsonl
        [--mesh data=2,model=2,seq=2] [--batch-size N] [--bucket N] [--distributed ...]
        [generation options as in `dllm-jax generate`: --gen-length --block-length --steps
         --controller --threshold --factor --alg-temp --temperature --cfg --cache
         --refresh-every --seed --chat] [--controller simsd --draft-model DIR]

Input: one JSON object per line, {"id": ID, "prompt": "text"} or {"id": ID, "prompt_ids":
[1, 2, 3]} (ID a non-empty string or an integer, unique in the file; ids are compared as
strings, so 1 and "1" are the same id and the second is a repeat; an answer carries its id as
the input wrote it). A line that is not such an object (bad JSON, no id, a repeated id, no
prompt, ids outside the vocabulary, words outside a task model's vocabulary, text without a
tokenizer) is rejected: reported on stderr with its line number and skipped; the rest still
runs, and the run ends with the count of rejected lines and exit status 1 (0: no line
rejected; 2: nothing decoded because of a usage error; 3: another process of a
--distributed run was lost). With --max-errors N, more than N
rejected lines stop the run before anything is decoded.

Output: one JSON object per answer, {"id", "tokens", "text", "nfe", "steps"} as
`dllm-jax generate --json` prints them (tokens cut at the first EOS), in the order batches
finish. Each finished batch is appended with ONE write, flushed and fsync'ed, so after a crash
or a kill the file holds whole batches, plus at most one partial line at the end.

Restart: run the same command again. Ids already in the output are skipped; a trailing
partial line (a write cut by the kill) is truncated away first. Nothing is lost and nothing is
written twice.

Settings: the decoding settings (model, draft model, dtype, every decode flag with defaults
resolved) are recorded at the first start in OUTPUT.settings.json (written atomically). A
restart with other settings is refused, naming the flags that differ, since its answers would
be appended to answers made differently; --force-new-settings appends anyway and records the
new settings.

Draft model: --draft-model DIR drafts for a speculative controller (simsd) with a second
model folder with the same tokenizer (loaded with --dtype on the same mesh), as in `dllm-jax
generate`; refused with any other controller, and a missing or unusable folder is refused
before anything is read or decoded. The folder is part of the recorded settings: resuming with
another draft model, or without one where there was one, or the reverse, is refused naming
--draft-model.

Locking: a run holds an exclusive lock on OUTPUT.lock (`fcntl.flock`; the file names its pid
and host) from before it reads the output until it ends, so a second run on the same output
is refused with the owner named instead of decoding every id again. The kernel drops the lock
of a killed run; the next run takes the leftover file over with a notice.

Bucketing: pending prompts are sorted by length and cut into batches of --batch-size; each
batch is left-padded to its longest prompt rounded up to a multiple of --bucket (and of the
mesh's seq axis), and the last batch is filled up with copies of a real row whose answers
are dropped. So there is one compile per bucket length, not per prompt length.

Progress: a bar over the input rows on a terminal (not with --quiet; under --distributed
only process 0 draws it), else one line per batch; at the end one summary line: answered,
skipped (already in the output), rejected, seconds.

Multi-process (TPU pod slice, GPU nodes), --distributed: every process runs the same command;
`jax.distributed.initialize()` joins them (coordinator from --coordinator-address
--num-processes --process-id, else from the platform: TPU, SLURM, JAX_COORDINATOR_ADDRESS).
--mesh is then ONE mesh over all processes' devices (`dllm_jax.multihost`): devices in
process order, `model` innermost, so `model` stays inside a process while it fits one and
`data` runs across processes (a larger `model` spans processes). Each process restores only
the checkpoint shards its devices hold, reads the whole --input (the same file everywhere,
checked) and feeds each batch's rows its devices hold; the answers are gathered and
appended by process 0 to OUTPUT, or with --output-per-host each process appends the rows its
devices hold to OUTPUT.<index>-of-<count> (or OUTPUT with `{process}` replaced). Restart:
the same command on every process (with --output-per-host, the same process count); the
processes agree on the answered ids before decoding, so nothing is lost or written twice.
A process that stops (killed, crashed) makes the others print one `error:` line and exit
with status 3 within --peer-timeout seconds (a failed collective says so at once).
--hosts-independent keeps hosts apart: each takes the input lines with (line number - 1) %
process_count == process_index, builds its mesh from its local devices, never waits for the
others while decoding, and writes OUTPUT.<index>-of-<count>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from dllm_jax import draft_cli
from dllm_jax.batch_io import (SETTINGS_FORMAT, append_records, bucket_length,  # noqa: F401
                               check_settings, id_key, make_batches, output_path, parse_line,
                               read_input, recover_output, settings_path)
from dllm_jax.cli_options import (UsageError, add_generation_options, add_quantize_option,
                                  check_number, check_quantize, decode_fingerprint,
                                  decode_settings)

DEFAULT_BATCH_SIZE = 8
DEFAULT_BUCKET = 16


# ----------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder from `dllm-jax convert` (default: the bundled model)")
    p.add_argument("--input", required=True, help="JSONL file of {id, prompt | prompt_ids}")
    p.add_argument("--output", required=True,
                   help="JSONL file the answers are appended to (restart-safe)")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,model=2,seq=2 (default: all local devices "
                        "on data)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"prompts per decode (default {DEFAULT_BATCH_SIZE}; rounded up to a "
                        f"multiple of the mesh's data axis)")
    p.add_argument("--bucket", type=int, default=DEFAULT_BUCKET,
                   help=f"pad prompt lengths up to a multiple of this (default {DEFAULT_BUCKET})")
    p.add_argument("--dtype", default=None, help="params dtype (default: as stored)")
    p.add_argument("--distributed", action="store_true",
                   help="one run over several processes (a TPU pod slice, GPU nodes): "
                        "jax.distributed.initialize(), then --mesh is ONE mesh over every "
                        "process's devices (model inside a process, data across them)")
    p.add_argument("--hosts-independent", action="store_true",
                   help="with --distributed: each host decodes its own share of the input "
                        "on its own devices and writes its own file (small models)")
    p.add_argument("--output-per-host", action="store_true",
                   help="with --distributed: each process writes the answers its devices "
                        "hold to OUTPUT.<index>-of-<count> instead of process 0 writing all")
    p.add_argument("--coordinator-address", default=None,
                   help="with --distributed: HOST:PORT of process 0 (default: from the "
                        "platform, or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed")
    p.add_argument("--peer-timeout", type=int, default=None, metavar="SECONDS",
                   help="with --distributed: a process silent this long counts as lost and "
                        "the others stop with an error (default 60)")
    p.add_argument("--max-errors", type=int, default=None, metavar="N",
                   help="stop before decoding when more than N input lines are rejected "
                        "(default: no limit; rejected lines are skipped, and the exit status "
                        "is 1)")
    p.add_argument("--force-new-settings", action="store_true",
                   help="append to an output made with other decoding settings (recorded in "
                        "OUTPUT.settings.json) instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_generation_options(p)
    draft_cli.add_argument(p, " (loaded with --dtype; part of the recorded settings)")
    add_quantize_option(p)


class _Rejects:
    """Counts and reports rejected input lines."""

    def __init__(self, show: bool = True) -> None:
        self.count, self.show = 0, show

    def __call__(self, msg: str) -> None:
        self.count += 1
        if self.show:
            print(msg, file=sys.stderr, flush=True)

    def check(self, max_errors: int | None, lines: int) -> None:
        if max_errors is not None and self.count > max_errors:
            raise UsageError(f"{self.count} of {lines} input lines were rejected (reported "
                             f"above), more than --max-errors {max_errors}; nothing was "
                             f"decoded: fix the lines or raise --max-errors.")


def _check_flags(args: argparse.Namespace) -> None:
    """Checks of the flags that need neither a model nor the runtime."""
    if not args.distributed:
        given = [f for f, v in (("--coordinator-address", args.coordinator_address),
                                ("--num-processes", args.num_processes),
                                ("--process-id", args.process_id),
                                ("--hosts-independent", args.hosts_independent or None),
                                ("--output-per-host", args.output_per_host or None),
                                ("--peer-timeout", args.peer_timeout)) if v is not None]
        if given:
            raise UsageError(f"{' / '.join(given)} need{'s' if len(given) == 1 else ''} "
                             f"--distributed; add it, or drop them on one host.")
    if args.hosts_independent and args.output_per_host:
        raise UsageError("--hosts-independent always writes one output per host; drop "
                         "--output-per-host.")
    check_number(args.batch_size, "--batch-size", minimum=1, example=DEFAULT_BATCH_SIZE)
    check_number(args.bucket, "--bucket", minimum=1, example=DEFAULT_BUCKET)
    check_number(args.max_errors, "--max-errors", minimum=0, example=10)
    check_number(args.peer_timeout, "--peer-timeout", minimum=1, example=60)
    if args.dtype is not None:
        from dllm_jax.checkpoint import CheckpointError, dtype_name

        try:
            dtype_name(args.dtype)
        except CheckpointError as e:
            raise UsageError(f"--dtype: {e}") from None


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    if not args.distributed:
        return _run(args)
    from dllm_jax import multihost as MH

    timeout = args.peer_timeout or MH.DEFAULT_PEER_TIMEOUT
    MH.initialize(args.coordinator_address, args.num_processes, args.process_id, timeout)
    try:
        return _run(args)
    except BaseException as e:  # noqa: BLE001 - one line, then out without jax's shutdown
        import traceback

        from dllm_jax.checkpoint import CheckpointError
        from dllm_jax.config import ConfigError
        from dllm_jax.tokenizer import TokenizerError

        if isinstance(e, (ConfigError, CheckpointError, TokenizerError, MH.ShardingError)):
            MH.exit_now(2, f"error: {e}", timeout)
        if isinstance(e, OSError):
            MH.exit_now(2, f"error: {e.filename or ''}: {e.strerror or e}.", timeout)
        if isinstance(e, KeyboardInterrupt):
            MH.exit_now(130, "error: interrupted.", timeout)
        if MH.is_collective_failure(e):
            MH.exit_now(MH.EXIT_PEER_LOST, MH.lost_peer_line(e), timeout)
        traceback.print_exc()
        MH.exit_now(1, None, timeout)


def _run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from dllm_jax import multihost as MH
    from dllm_jax import progress, session
    from dllm_jax import sharding as S
    from dllm_jax.checkpoint import CheckpointError, dtype_name, load_config
    from dllm_jax.config import ConfigError
    from dllm_jax.decode import GenerateError
    from dllm_jax.files import ExclusiveLock, check_output_path
    from dllm_jax.tokenizer import TokenizerError

    t0 = time.perf_counter()
    pidx, pcount = jax.process_index(), jax.process_count()
    alone = args.hosts_independent or pcount == 1    # this process decodes on its own
    per_host = args.hosts_independent or args.output_per_host
    lead = alone or pidx == 0                        # prints progress and rejected lines
    writer = per_host or pidx == 0
    quiet = args.quiet or not lead
    say = lambda msg: progress.line(msg, quiet=quiet)  # noqa: E731
    warn = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model_dir = session.resolve_model_dir(args.model)
    try:
        mesh = (S.make_mesh(args.mesh, devices=jax.local_devices()) if args.hosts_independent
                else MH.global_mesh(args.mesh))
    except S.ShardingError as e:
        raise UsageError(f"--mesh: {e}") from None
    sizes = S.mesh_sizes(mesh)
    batch_size = bucket_length(args.batch_size, sizes["data"])
    bucket = math.lcm(args.bucket, sizes["seq"])
    gen, controller = decode_settings(args, str(model_dir))
    check_quantize(args.quantize)
    draft_dir = None
    if args.draft_model is not None:
        draft_cli.refuse_unless_speculative(controller.verify is not None, args.controller)
        draft_dir = draft_cli.resolve(args.draft_model)
    _, stored_dtype = load_config(model_dir)
    fingerprint = decode_fingerprint(args, gen)
    settings = {"--model": str(model_dir.absolute()),
                # only when given: records of runs without a draft model lack the key
                **({} if draft_dir is None else {draft_cli.FLAG: str(draft_dir.absolute())}),
                **({} if args.quantize is None else {"--quantize": args.quantize}),
                "--dtype": dtype_name(args.dtype) if args.dtype else stored_dtype, **fingerprint}
    if per_host:
        out_path = output_path(os.path.expanduser(args.output), pidx, pcount)
    elif "{process}" in args.output:
        raise UsageError(f"--output {args.output} names {{process}}, but one file is written "
                         f"(by process 0); add --output-per-host or drop {{process}}.")
    else:
        out_path = os.path.expanduser(args.output)
    in_path = os.path.expanduser(args.input)
    rejects = _Rejects(show=lead)
    lock, failure, created_sidecar = None, None, False
    items, done, check = [], set(), 0
    with MH.Watchdog(args.peer_timeout or MH.DEFAULT_PEER_TIMEOUT):
        try:
            try:       # what can fail on one process only: it must not leave the others waiting
                if not os.path.isfile(in_path):
                    raise UsageError(f"--input {in_path} is not a file" + (
                        "" if os.path.exists(in_path) else " (it does not exist)") + "; pass "
                        "the JSONL file of prompts" + ("" if alone else " on every host") + ".")
                if writer:
                    check_output_path(out_path, "--output")
                    if os.path.abspath(in_path) == os.path.abspath(out_path):
                        raise UsageError(f"--input and --output are the same file ({in_path}); "
                                         f"write the answers to another file.")
                    lock = ExclusiveLock(out_path + ".lock", f"--output {out_path}")
                    lock.acquire(warn)
                with open(in_path, "rb") as f:
                    check = MH.digest(f.read(), json.dumps(fingerprint, sort_keys=True).encode())
                items = read_input(in_path, *((pidx, pcount) if alone else (0, 1)), rejects)
                rejects.check(args.max_errors, len(items) + rejects.count)
                if writer:
                    created_sidecar = check_settings(out_path, settings, args.force_new_settings,
                                                     warn)
                    done = recover_output(out_path, warn)
            except (ConfigError, CheckpointError, OSError) as e:
                failure = e
            MH.agree(mesh, failure is not None, check, np.zeros(0, bool))
            if failure is not None:
                raise failure
            answered = MH.agree(mesh, False, check, np.array(
                [id_key(it[1]) in done for it in items], bool))
            pending = [it for it, a in zip(items, answered) if not a]
            lines = len(items) + rejects.count
            where = ("this host" if args.hosts_independent else
                     f"{pcount} processes" if pcount > 1 else "this run")
            say(f"batch: {len(items)} prompts for {where}"
                + (f" ({pidx + 1}/{pcount})" if args.hosts_independent else "")
                + f", {len(items) - len(pending)} already in {out_path}, {len(pending)} to "
                f"decode; mesh {S.format_mesh_spec(sizes)} ({MH.describe(mesh)}), batch "
                f"{batch_size}.")
            decoded = written = 0
            if pending:
                sess = session.load(model_dir, dtype=args.dtype, mesh=mesh,
                                    quantize=args.quantize)
                draft = (None if draft_dir is None else
                         draft_cli.load(draft_dir, dtype=args.dtype, mesh=mesh))
                if MH.is_multiprocess(mesh):
                    held, total = MH.restored_share(sess.params)
                    progress.line(f"batch: process {pidx}/{pcount} restored {held} of {total} "
                                  f"bytes of params (the shards its devices hold).",
                                  quiet=args.quiet)
                seqs, rows = [], []
                for n, rid, text, ids in pending:
                    try:
                        ids = sess.encode(text if ids is None else ids, chat=args.chat)
                        session.check_prompt_ids(ids, sess.cfg, gen.gen_length)
                    except (session.SessionError, TokenizerError, ValueError) as e:
                        rejects(f"{in_path}:{n}: {e} Line skipped.")
                        continue
                    seqs.append(ids)
                    rows.append(rid)
                rejects.check(args.max_errors, lines)
                try:
                    decoded, written = _decode(sess, mesh, seqs, rows, gen, controller,
                                               out_path if writer else None, per_host,
                                               batch_size, bucket, jax.random.key(args.seed),
                                               say, quiet, draft)
                except GenerateError as e:
                    raise UsageError(str(e)) from None
            MH.barrier(f"dllm-jax batch done: {args.output}")
        finally:
            if created_sidecar and not os.path.exists(out_path):
                os.unlink(settings_path(out_path))    # nothing written: leave nothing behind
            if lock is not None:
                lock.release()
    target = out_path if alone or not per_host else output_path(args.output, "*", pcount)
    progress.summary(
        f"batch: {decoded} answered, {len(items) - len(pending)} skipped (already in {target}), "
        f"{rejects.count} of {lines} input lines rejected"
        + (" (reported above)" if rejects.count else "")
        + f", {time.perf_counter() - t0:.1f} s"
        + (f"; {written} answers written to {out_path}." if writer else "."),
        quiet=(args.quiet and not rejects.count) or not lead)
    return 1 if rejects.count else 0


def _decode(sess: Any, mesh: Any, seqs: list[list[int]], rows: list[Any], gen: Any,
            controller: Any, out_path: str | None, per_host: bool, batch_size: int,
            bucket: int, key: Any, say: Any, quiet: bool, draft: Any = None
            ) -> tuple[int, int]:
    """Decode `seqs` (one id list per row, ids `rows`) in length-bucketed batches `[B, P]`,
    B = `batch_size`, P a multiple of `bucket`; each finished batch's answers this process
    writes are appended to `out_path` (None: writes nothing), created at the first answer.
    `draft`: the draft model's session (`--draft-model`) or None. Returns (rows decoded,
    answers written)."""
    from dllm_jax import multihost as MH
    from dllm_jax import progress

    batches = make_batches([len(s) for s in seqs], batch_size)
    key, controller = MH.replicate(mesh, (key, controller))
    fd = None
    t0, finished, written = time.perf_counter(), 0, 0
    bar = progress.bar(len(rows), "batch", quiet=quiet, unit="prompt")
    lines = not progress.shows_bar(quiet)
    try:
        for bi, idx in enumerate(batches):
            length = bucket_length(max(len(seqs[i]) for i in idx), bucket)
            length = min(length, sess.cfg.max_position - gen.gen_length)
            prompt, valid = sess.pad([seqs[i] for i in idx], width=length, rows=batch_size)
            out = sess.generate_ids(MH.feed(mesh, prompt), MH.feed(mesh, valid), gen,
                                    controller, key=key, draft=draft)
            mine, host = MH.answers_rows(mesh, out, per_host)
            answers = sess.answers(host)
            records = [{"id": rows[idx[r]], **answers[r].to_json()}
                       for r in mine if r < len(idx)]
            if out_path is not None and records:
                if fd is None:
                    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                append_records(fd, records)
                written += len(records)
            finished += len(idx)
            bar.update(len(idx))
            if lines:
                dt = time.perf_counter() - t0
                say(f"batch {bi + 1}/{len(batches)}: {finished}/{len(rows)} answers "
                    f"({100.0 * finished / max(len(rows), 1):.0f}%), prompt bucket {length}, "
                    f"{finished * gen.gen_length / dt:.1f} answer tokens/s")
    finally:
        bar.close()
        if fd is not None:
            os.close(fd)
    return finished, written
