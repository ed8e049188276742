"""Cheaper refreshes against Fast-dLLM's full refresh (issue 14, item 3), on one model.

    python benchmarks/refresh_agreement.py [--model DIR] [--tasks copy,sort,shuffle,latin]
        [--n 100] [--block-length 8] [--gen-length 32] [--threshold 0.9]

Decodes the same held-out instances with the dual cache three ways (full refresh, `--refresh-
scope answer`, `--refresh-blocks 2`), side by side in one process, and prints per variant:
how many answers equal the full refresh's token for token, the fraction of answer positions
that agree, accuracy (Wilson 95 %), mean NFE, and the median decode time per batch relative to
the full refresh (a ratio; absolute times only count from a GPU). Accuracy with the bench's
content-token metrics: `dllm-jax bench quality --settings "threshold 0.9 dual,threshold 0.9 dual
answer-refresh,threshold 0.9 dual refresh/2"`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"full refresh": {}, "answer-refresh": {"refresh_scope": "answer"},
            "refresh/2": {"refresh_blocks": 2}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--tasks", default="copy,sort,shuffle,latin,sudoku,insert_random")
    ap.add_argument("--n", type=int, default=100, help="held-out instances per task")
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=200)
    args = ap.parse_args()

    import jax

    from controllers import make_controller
    from dllm_jax import session
    from dllm_jax.bench.measure import make_instances
    from dllm_jax.bench.quality import choose_tasks
    from dllm_jax.bench.stats import wilson_interval
    from dllm_jax.config import GenerateConfig
    from dllm_jax.decode import generate

    model = session.load(args.model)
    tok = model.tokenizer
    tasks = choose_tasks("v1", args.tasks, model.train_config)
    insts = make_instances(tasks, args.n, 1234)
    items = [(tasks[name], x) for name in tasks for x in insts[name]]
    seqs = [tok.encode(x.prompt) for _, x in items]
    width = max(map(len, seqs))
    ctrl = make_controller("threshold", threshold=args.threshold)
    rows = min(args.batch_size, len(seqs))
    batches = [session.left_pad(seqs[i:i + rows], tok.pad_id, width, rows)
               for i in range(0, len(seqs), rows)]
    out: dict[str, dict] = {}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(3):            # round-robin, so that load on the machine hits all alike
        for name, opt in VARIANTS.items():
            gen = GenerateConfig(args.gen_length, args.block_length, args.gen_length,
                                 cache="dual", **opt)
            toks, nfes = [], []
            for ids, valid in batches:
                t0 = time.perf_counter()
                res = generate(model.params, model.cfg, ids, gen, ctrl, prompt_valid=valid)
                jax.block_until_ready(res.tokens)
                if rep:                              # the first round compiles
                    times[name].append(time.perf_counter() - t0)
                toks.append(np.asarray(res.tokens))
                nfes.append(np.asarray(res.stats.nfe))
            out[name] = {"tokens": np.concatenate(toks)[:len(items)],
                         "nfe": np.concatenate(nfes)[:len(items)]}
    eos = tok.eos_id
    ref = out["full refresh"]["tokens"]
    base = statistics.median(times["full refresh"])
    print(f"# {model.model_dir.name}: {len(items)} held-out instances ({args.tasks}), answer "
          f"{args.gen_length} in blocks of {args.block_length}, threshold {args.threshold}, "
          f"dual cache, backend {jax.default_backend()}")
    print("| variant | answers equal to full refresh | positions equal | accuracy % [95% CI] "
          "| mean NFE | decode time / full refresh |")
    print("|---|---|---|---|---|---|")
    for name, r in out.items():
        same = (r["tokens"] == ref).all(axis=1)
        ok = []
        for (task, inst), row in zip(items, r["tokens"]):
            ids = [int(t) for t in row]
            ids = ids[:ids.index(eos)] if eos in ids else ids
            ok.append(task.score(inst, tok.decode(ids, skip_special_tokens=True)).valid)
        k = int(sum(ok))
        lo, hi = wilson_interval(k, len(ok))
        print(f"| {name} | {same.mean() * 100:.1f} % | {(r['tokens'] == ref).mean() * 100:.1f} % "
              f"| {k / len(ok) * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}] | "
              f"{r['nfe'].mean():.2f} | {statistics.median(times[name]) / base:.2f} |")


if __name__ == "__main__":
    main()
