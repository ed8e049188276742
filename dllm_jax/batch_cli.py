"""`dllm-jax batch`: decode a JSONL file of prompts, restartably, on one device, a mesh, or a pod.

Contract:

    dllm-jax batch --model DIR --input prompts.jsonl --output answers.jsonl
        [--mesh data=2,model=2,seq=2] [--batch-size N] [--bucket N] [--distributed ...]
        [generation options as in `dllm-jax generate`: --gen-length --block-length --steps
         --controller --threshold --factor --alg-temp --temperature --cfg --cache
         --refresh-every --seed --chat]

Input: one JSON object per line, {"id": ID, "prompt": "text"} or {"id": ID, "prompt_ids":
[1, 2, 3]} (ID a string or an integer, unique in the file). A line that is not such an object
(bad JSON, no id, a repeated id, no prompt, ids outside the vocabulary, text without a
tokenizer) is reported on stderr with its line number and skipped; the rest still runs.

Output: one JSON object per answer, {"id", "tokens", "text", "nfe", "steps"} as
`dllm-jax generate --json` prints them (tokens cut at the first EOS), in the order batches
finish. Each finished batch is appended with ONE write, flushed and fsync'ed, so after a crash
or a kill the file holds whole batches, plus at most one partial line at the end.

Restart: run the same command again. Ids already in the output are skipped; a trailing
partial line (a write cut by the kill) is truncated away first. Nothing is lost and nothing is
written twice.

Bucketing: pending prompts are sorted by length and cut into batches of --batch-size; each
batch is left-padded to its longest prompt rounded up to a multiple of --bucket (and of the
mesh's seq axis), and the last batch is filled up with copies of a real row whose answers
are dropped. So there is one compile per bucket length, not per prompt length.

Multi-host (TPU pod, multi-node GPU): --distributed calls `jax.distributed.initialize()`
(arguments auto-detected on TPU / SLURM, or given with --coordinator-address --num-processes
--process-id). Each host takes the input lines with (line number - 1) % process_count ==
process_index, builds its mesh from its own local devices (hosts decode independently: no
cross-host collective, so a slow host never stalls the others) and writes its own output
file, `OUTPUT.<index>-of-<count>` (or OUTPUT with `{process}` replaced by the index).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Iterable

from dllm_jax.cli_options import UsageError, add_generation_options, decode_settings

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
                   help="call jax.distributed.initialize() (multi-host); each host decodes its "
                        "slice of the input")
    p.add_argument("--coordinator-address", default=None, help="with --distributed")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_generation_options(p)


# ----------------------------------------------------------------------------- input
def _id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def parse_line(text: str) -> tuple[Any, str | None, list[int] | None]:
    """One input line -> (id, prompt text or None, prompt ids or None); ValueError says why."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "id" not in obj:
        raise ValueError('no "id"')
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError('"id" must be a string or an integer')
    has_text, has_ids = "prompt" in obj, "prompt_ids" in obj
    if has_text == has_ids:
        raise ValueError('give exactly one of "prompt" and "prompt_ids"')
    if has_text:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError('"prompt" must be a non-empty string')
        return rid, obj["prompt"], None
    ids = obj["prompt_ids"]
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise ValueError('"prompt_ids" must be a non-empty list of integers')
    return rid, None, ids


def read_input(path: str, process_index: int = 0, process_count: int = 1,
               warn: Any = None) -> list[tuple[int, Any, str | None, list[int] | None]]:
    """This host's well-formed lines as (line number, id, text, ids); bad lines reported."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read --input {path}: {e.strerror}.") from None
    items = []
    seen: set[str] = set()
    with f:
        for n, line in enumerate(f, start=1):
            if (n - 1) % process_count != process_index or not line.strip():
                continue
            try:
                rid, text, ids = parse_line(line)
            except ValueError as e:
                warn(f"{path}:{n}: {e}; line skipped.")
                continue
            key = _id_key(rid)
            if key in seen:
                warn(f"{path}:{n}: id {key} repeats an earlier line; line skipped.")
                continue
            seen.add(key)
            items.append((n, rid, text, ids))
    return items


# ----------------------------------------------------------------------------- output
def recover_output(path: str, warn: Any = None) -> set[str]:
    """Ids (as `_id_key`) already in the output. A trailing partial line left by a kill is
    truncated away; a complete line that cannot be read is reported and ignored."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        warn(f"{path}: removing a partial last line ({len(data) - end} bytes) left by an "
             f"interrupted run.")
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    done: set[str] = set()
    for n, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(_id_key(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            warn(f"{path}:{n}: not an answer line; ignored.")
    return done


def append_records(fd: int, records: Iterable[dict]) -> None:
    """Append whole lines with one write (looped only if the OS writes short), then fsync."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def output_path(path: str, process_index: int, process_count: int) -> str:
    if "{process}" in path:
        return path.replace("{process}", str(process_index))
    if process_count > 1:
        return f"{path}.{process_index}-of-{process_count}"
    return path


# ----------------------------------------------------------------------------- batching
def make_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (stable), cut into batches: similar lengths decode together."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def bucket_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------- run
def _distributed_init(args: argparse.Namespace) -> None:
    import jax

    kwargs = {k: v for k, v in (("coordinator_address", args.coordinator_address),
                                ("num_processes", args.num_processes),
                                ("process_id", args.process_id)) if v is not None}
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - environment problems: one sentence
        raise UsageError(f"jax.distributed.initialize() failed ({str(e).splitlines()[0]}); "
                         f"pass --coordinator-address, --num-processes and --process-id, or "
                         f"drop --distributed on one host.") from None


def run(args: argparse.Namespace) -> int:
    if args.distributed:
        _distributed_init(args)
    elif any(v is not None for v in (args.coordinator_address, args.num_processes,
                                     args.process_id)):
        raise UsageError("--coordinator-address / --num-processes / --process-id need "
                         "--distributed.")
    import jax

    from dllm_jax import session
    from dllm_jax import sharding as S
    from dllm_jax.decode import GenerateError
    from dllm_jax.tokenizer import TokenizerError

    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr,
                                                                   flush=True))
    warn = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.batch_size <= 0 or args.bucket <= 0:
        raise UsageError("--batch-size and --bucket must be positive.")
    pidx, pcount = jax.process_index(), jax.process_count()
    model_dir = session.resolve_model_dir(args.model)
    try:
        mesh = S.make_mesh(args.mesh, devices=jax.local_devices())
    except S.ShardingError as e:
        raise UsageError(f"--mesh: {e}") from None
    sizes = S.mesh_sizes(mesh)
    batch_size = bucket_length(args.batch_size, sizes["data"])
    bucket = math.lcm(args.bucket, sizes["seq"])
    gen, controller = decode_settings(args, str(model_dir))

    out_path = output_path(args.output, pidx, pcount)
    items = read_input(args.input, pidx, pcount, warn)
    done = recover_output(out_path, warn)
    pending = [it for it in items if _id_key(it[1]) not in done]
    total = len(items)
    say(f"batch: {total} prompts for this host ({pidx + 1}/{pcount}), {total - len(pending)} "
        f"already in {out_path}, {len(pending)} to decode; mesh {S.format_mesh_spec(sizes)}, "
        f"batch {batch_size}.")
    if not pending:
        return 0

    sess = session.load(model_dir, dtype=args.dtype, mesh=mesh)
    seqs, rows = [], []
    for n, rid, text, ids in pending:
        try:
            ids = sess.encode(text if ids is None else ids, chat=args.chat)
            session.check_prompt_ids(ids, sess.cfg, gen.gen_length)
        except (session.SessionError, TokenizerError, ValueError) as e:
            warn(f"{args.input}:{n}: {e} Line skipped.")
            continue
        seqs.append(ids)
        rows.append(rid)

    batches = make_batches([len(s) for s in seqs], batch_size)
    key = jax.random.key(args.seed)
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    t0, finished, answer_tokens = time.perf_counter(), 0, 0
    try:
        for bi, idx in enumerate(batches):
            length = bucket_length(max(len(seqs[i]) for i in idx), bucket)
            length = min(length, sess.cfg.max_position - gen.gen_length)
            prompt, valid = sess.pad([seqs[i] for i in idx], width=length, rows=batch_size)
            try:
                out = sess.generate_ids(prompt, valid, gen, controller, key=key)
            except GenerateError as e:
                raise UsageError(str(e)) from None
            records = [{"id": rows[i], **a.to_json()}
                       for i, a in zip(idx, sess.answers(out, len(idx)))]
            append_records(fd, records)
            finished += len(idx)
            answer_tokens += len(idx) * gen.gen_length
            dt = time.perf_counter() - t0
            say(f"batch {bi + 1}/{len(batches)}: {finished}/{len(rows)} answers "
                f"({100.0 * finished / max(len(rows), 1):.0f}%), prompt bucket {length}, "
                f"{answer_tokens / dt:.1f} answer tokens/s")
    finally:
        os.close(fd)
    return 0
