"""`dllm-jax batch`: decode a JSONL file of prompts, restartably, on one device, a mesh, or a pod.

Contract:

    dllm-jax batch --model DIR --input prompts.jsonl --output answers.jsonl
        [--mesh data=2,model=2,seq=2] [--batch-size N] [--bucket N] [--distributed ...]
        [generation options as in `dllm-jax generate`: --gen-length --block-length --steps
         --controller --threshold --factor --alg-temp --temperature --cfg --cache
         --refresh-every --seed --chat]

Input: one JSON object per line, {"id": ID, "prompt": "text"} or {"id": ID, "prompt_ids":
[1, 2, 3]} (ID a non-empty string or an integer, unique in the file; ids are compared as
strings, so 1 and "1" are the same id and the second is a repeat; an answer carries its id as
the input wrote it). A line that is not such an object (bad JSON, no id, a repeated id, no
prompt, ids outside the vocabulary, words outside a task model's vocabulary, text without a
tokenizer) is rejected: reported on stderr with its line number and skipped; the rest still
runs, and the run ends with the count of rejected lines and exit status 1 (0: no line
rejected; 2: nothing decoded because of a usage error). With --max-errors N, more than N
rejected lines stop the run before anything is decoded.

Output: one JSON object per answer, {"id", "tokens", "text", "nfe", "steps"} as
`dllm-jax generate --json` prints them (tokens cut at the first EOS), in the order batches
finish. Each finished batch is appended with ONE write, flushed and fsync'ed, so after a crash
or a kill the file holds whole batches, plus at most one partial line at the end.

Restart: run the same command again. Ids already in the output are skipped; a trailing
partial line (a write cut by the kill) is truncated away first. Nothing is lost and nothing is
written twice.

Settings: the decoding settings (model, dtype, every decode flag with defaults resolved) are
recorded at the first start in OUTPUT.settings.json (written atomically). A restart with
other settings is refused, naming the flags that differ, since its answers would be appended
to answers made differently; --force-new-settings appends anyway and records the new settings.

Locking: a run holds an exclusive lock on OUTPUT.lock (`fcntl.flock`; the file names its pid
and host) from before it reads the output until it ends, so a second run on the same output
is refused with the owner named instead of decoding every id again. The kernel drops the lock
of a killed run; the next run takes the leftover file over with a notice.

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

from dllm_jax.cli_options import (UsageError, add_generation_options, check_number,
                                  decode_fingerprint, decode_settings)

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
    p.add_argument("--max-errors", type=int, default=None, metavar="N",
                   help="stop before decoding when more than N input lines are rejected "
                        "(default: no limit; rejected lines are skipped, and the exit status "
                        "is 1)")
    p.add_argument("--force-new-settings", action="store_true",
                   help="append to an output made with other decoding settings (recorded in "
                        "OUTPUT.settings.json) instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_generation_options(p)


# ----------------------------------------------------------------------------- input
def _id_key(value: Any) -> str:
    """Ids compare as strings: 1 and "1" are one id."""
    return str(value)


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
    if isinstance(rid, str) and not rid.strip():
        raise ValueError('"id" must not be empty')
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
    seen: dict[str, int] = {}
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
                warn(f"{path}:{n}: id {json.dumps(rid)} repeats the id of line {seen[key]} (ids "
                     f"are compared as strings); line skipped.")
                continue
            seen[key] = n
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
    data = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                   for r in records).encode("utf-8")
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


SETTINGS_FORMAT = "dllm-jax-batch-settings"


def settings_path(out_path: str) -> str:
    return out_path + ".settings.json"


def _read_settings(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read ({e}); remove it to record the settings of "
                         f"this run.") from None
    if not isinstance(record, dict) or record.get("format") != SETTINGS_FORMAT or not isinstance(
            record.get("settings"), dict):
        raise UsageError(f"{path} is not a dllm-jax batch settings file; remove it to record "
                         f"the settings of this run.")
    return record["settings"]


def check_settings(out_path: str, settings: dict[str, Any], force: bool, warn: Any) -> bool:
    """Compare the run's settings with those recorded next to the output; record them (the
    first start, or with `force`). Returns True when this call created the sidecar file."""
    from dllm_jax.files import write_json

    side = settings_path(out_path)
    stored = _read_settings(side)
    has_answers = os.path.exists(out_path) and os.path.getsize(out_path) > 0
    if stored is not None and has_answers and stored != settings:
        diff = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        text = ", ".join(f"{k} (was {json.dumps(stored.get(k))}, now "
                         f"{json.dumps(settings.get(k))})" for k in diff)
        if not force:
            raise UsageError(
                f"{out_path} holds answers made with other settings: {text}; resume with the "
                f"recorded settings ({side}), choose another --output, or pass "
                f"--force-new-settings to append answers made with the new ones.")
        warn(f"warning: --force-new-settings: appending answers made with other settings "
             f"({text}) to {out_path}.")
    if stored == settings:
        return False
    if stored is None and has_answers:
        warn(f"{out_path} has answers but no settings record; recording this run's settings in "
             f"{side}.")
    write_json(side, {"format": SETTINGS_FORMAT, "version": 1, "settings": settings},
               flag="--output")
    return stored is None


class _Rejects:
    """Counts and reports rejected input lines."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, msg: str) -> None:
        self.count += 1
        print(msg, file=sys.stderr, flush=True)

    def check(self, max_errors: int | None, lines: int) -> None:
        if max_errors is not None and self.count > max_errors:
            raise UsageError(f"{self.count} of {lines} input lines were rejected (reported "
                             f"above), more than --max-errors {max_errors}; nothing was "
                             f"decoded: fix the lines or raise --max-errors.")


def _prepare(args: argparse.Namespace) -> None:
    """Checks of the flags that need no model."""
    if args.distributed:
        _distributed_init(args)
    elif any(v is not None for v in (args.coordinator_address, args.num_processes,
                                     args.process_id)):
        raise UsageError("--coordinator-address / --num-processes / --process-id need "
                         "--distributed.")
    check_number(args.batch_size, "--batch-size", minimum=1, example=DEFAULT_BATCH_SIZE)
    check_number(args.bucket, "--bucket", minimum=1, example=DEFAULT_BUCKET)
    check_number(args.max_errors, "--max-errors", minimum=0, example=10)
    if args.dtype is not None:
        from dllm_jax.checkpoint import CheckpointError, dtype_name

        try:
            dtype_name(args.dtype)
        except CheckpointError as e:
            raise UsageError(f"--dtype: {e}") from None


def run(args: argparse.Namespace) -> int:
    _prepare(args)
    import jax

    from dllm_jax import session
    from dllm_jax import sharding as S
    from dllm_jax.checkpoint import dtype_name, load_config
    from dllm_jax.decode import GenerateError
    from dllm_jax.files import ExclusiveLock, check_output_path
    from dllm_jax.tokenizer import TokenizerError

    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr,
                                                                   flush=True))
    warn = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
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
    _, stored_dtype = load_config(model_dir)
    settings = {"--model": str(model_dir.absolute()),
                "--dtype": dtype_name(args.dtype) if args.dtype else stored_dtype,
                **decode_fingerprint(args, gen)}

    out_path = output_path(os.path.expanduser(args.output), pidx, pcount)
    check_output_path(out_path, "--output")
    in_path = os.path.expanduser(args.input)
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise UsageError(f"--input and --output are the same file ({in_path}); write the "
                         f"answers to another file.")
    if not os.path.isfile(in_path):
        raise UsageError(f"--input {in_path} is not a file" + (
            "" if os.path.exists(in_path) else " (it does not exist)") + "; pass the JSONL "
            "file of prompts.")
    lock = ExclusiveLock(out_path + ".lock", f"--output {out_path}")
    lock.acquire(warn)
    created_sidecar = False
    try:
        rejects = _Rejects()
        items = read_input(in_path, pidx, pcount, rejects)
        lines = len(items) + rejects.count
        rejects.check(args.max_errors, lines)
        created_sidecar = check_settings(out_path, settings, args.force_new_settings, warn)
        done = recover_output(out_path, warn)
        pending = [it for it in items if _id_key(it[1]) not in done]
        say(f"batch: {len(items)} prompts for this host ({pidx + 1}/{pcount}), "
            f"{len(items) - len(pending)} already in {out_path}, {len(pending)} to decode; mesh "
            f"{S.format_mesh_spec(sizes)}, batch {batch_size}.")
        written = 0
        if pending:
            sess = session.load(model_dir, dtype=args.dtype, mesh=mesh)
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
                written = _decode(sess, seqs, rows, gen, controller, out_path, batch_size, bucket,
                                  jax.random.key(args.seed), say)
            except GenerateError as e:
                raise UsageError(str(e)) from None
    finally:
        if created_sidecar and not os.path.exists(out_path):
            os.unlink(settings_path(out_path))    # nothing written: leave nothing behind
        lock.release()
    if rejects.count:
        warn(f"batch: {rejects.count} of {lines} input lines rejected (reported above); "
             f"{written} answers written to {out_path}.")
        return 1
    say(f"batch: done, {written} answers written to {out_path} "
        f"({len(done)} were there already).")
    return 0


def _decode(sess: Any, seqs: list[list[int]], rows: list[Any], gen: Any, controller: Any,
            out_path: str, batch_size: int, bucket: int, key: Any, say: Any) -> int:
    """Decode `seqs` in length-bucketed batches, appending each finished batch to the output
    (created at the first answer); returns the answers written."""
    batches = make_batches([len(s) for s in seqs], batch_size)
    fd = None
    t0, finished, answer_tokens = time.perf_counter(), 0, 0
    try:
        for bi, idx in enumerate(batches):
            length = bucket_length(max(len(seqs[i]) for i in idx), bucket)
            length = min(length, sess.cfg.max_position - gen.gen_length)
            prompt, valid = sess.pad([seqs[i] for i in idx], width=length, rows=batch_size)
            out = sess.generate_ids(prompt, valid, gen, controller, key=key)
            records = [{"id": rows[i], **a.to_json()}
                       for i, a in zip(idx, sess.answers(out, len(idx)))]
            if fd is None:
                fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            append_records(fd, records)
            finished += len(idx)
            answer_tokens += len(idx) * gen.gen_length
            dt = time.perf_counter() - t0
            say(f"batch {bi + 1}/{len(batches)}: {finished}/{len(rows)} answers "
                f"({100.0 * finished / max(len(rows), 1):.0f}%), prompt bucket {length}, "
                f"{answer_tokens / dt:.1f} answer tokens/s")
    finally:
        if fd is not None:
            os.close(fd)
    return finished
