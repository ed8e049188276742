"""How often CE's rules fire when it decodes the quality bench's held-out instances.

    python benchmarks/ce_lookahead.py [--model DIR] [--tasks a,b] [--n 100] [--seed 1234]
        [--settings "ce t=0.7,ce,ce fitted t=0.7,ce fitted t=0.9"] [--json FILE]

For each setting (labels of `dllm_jax.bench.settings`, controllers `ce` / `ce_fitted`), the
same instances, layout and batches as `dllm-jax bench quality` (test split, seed, one block of
the model's answer length), decoded with `trace=True`; the CE rules are then replayed on the
trace (`features.update_trajectory` with the controller's filter, then `CE.rules`: the
decode loop's own functions), and the replayed decisions are checked equal to the trace's
commits. Counted over commits at CONTENT positions (up to and including the answer's first
EOS; EOS padding commits in the first forward and says nothing):
  commits      every commit
  look-ahead   commits the look-ahead made that the threshold rule would not (confidence
               below the threshold, forecast lower bound above it): the extra commits
  held         (step, position) pairs whose confidence cleared the threshold but that the
               stabilisation rule held back
  fallback     commits that neither rule asked for (at least one per row and step)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax import features as F
from dllm_jax import session
from dllm_jax.bench.measure import make_instances
from dllm_jax.bench.quality import choose_layout, choose_tasks, task_set_of
from dllm_jax.bench.settings import all_settings, select
from dllm_jax.config import GenerateConfig
from dllm_jax.decode import generate
from dllm_jax.scoring import left_pad, prompt_width
from dllm_jax.state import Features, Trajectory


@functools.partial(jax.jit, static_argnames=("ctrl", "gen"))
def replay_rules(trace, ctrl, gen):
    """Per step `[S, B, Lb]`: (decided commits, base, look-ahead, hold) of the CE rules."""
    lb = gen.block_length
    b = trace["candidate"].shape[1]

    def body(traj, s):
        live = s["block"] >= 0
        a0 = jnp.maximum(s["block"], 0) * lb
        feats = Features(candidate=s["candidate"], confidence=s["confidence"],
                         entropy=s["entropy"], margin=s["margin"], masked=s["masked"] & live)
        win = F.update_trajectory(traj.window(a0, lb), feats, gen.momentum_beta,
                                  ctrl.trajectory_filter)
        r = ctrl.rules(feats, win)
        commit, _ = ctrl.decide(feats, win, None, ())
        out = (commit & feats.masked, r["base"], r["lookahead"], r["hold"], a0)
        return traj.write_window(a0, win), out

    xs = {k: trace[k] for k in ("candidate", "confidence", "entropy", "margin", "masked",
                                "block")}
    return jax.lax.scan(body, Trajectory.zeros(b, gen.gen_length), xs)[1]


def count(model, tok, items, setting, layout, batch_size, model_dir):
    ctrl = setting.build(model_dir)
    gen = GenerateConfig(gen_length=layout.gen_length, block_length=layout.block_length,
                         steps=setting.steps(layout.gen_length), cache=setting.cache_mode,
                         trace=True)
    eos = tok.eos_id if tok.eos_id is not None else model.cfg.eos_token_id
    seqs = [tok.encode(inst.prompt) for _, inst in items]
    rows = min(batch_size, len(seqs))
    c = dict(commits=0, lookahead=0, held=0, fallback=0, commits_all=0, lookahead_all=0,
             answers=0, nfe=0)
    for start in range(0, len(seqs), rows):
        chunk = seqs[start:start + rows]
        ids, valid = left_pad(chunk, tok.pad_id, layout.width, rows)
        out = generate(model.params, model.cfg, ids, gen, ctrl, prompt_valid=valid)
        tr = {k: jnp.asarray(v) for k, v in out.stats.trace.items()}
        dec, base, look, hold, a0 = (np.asarray(a) for a in replay_rules(tr, ctrl, gen))
        commit = np.asarray(tr["commit"])
        assert (dec == commit).all(), f"{setting.label}: replayed decisions differ from the trace"
        k = len(chunk)
        ans = np.asarray(out.tokens)[:k]
        is_eos = ans == eos
        last = np.where(is_eos.any(1), is_eos.argmax(1), ans.shape[1] - 1)        # [k]
        pos = a0[:, None, None] + np.arange(layout.block_length)[None, None, :]  # [S, 1, Lb]
        content = (pos <= last[None, :, None])                                    # [S, k, Lb]
        commit, base, look, hold = (a[:, :k] for a in (commit, base, look, hold))
        masked = np.asarray(tr["masked"])[:, :k] & (np.asarray(tr["block"]) >= 0)[:, None, None]
        extra = commit & look & ~base
        c["commits"] += int((commit & content).sum())
        c["lookahead"] += int((extra & content).sum())
        c["held"] += int((masked & base & hold & content).sum())
        c["fallback"] += int((commit & ~base & ~look & content).sum())
        c["commits_all"] += int(commit.sum())
        c["lookahead_all"] += int(extra.sum())
        c["answers"] += k
        c["nfe"] += int(np.asarray(out.stats.nfe)[:k].sum())
    f = ctrl.trajectory_filter
    return {"setting": setting.label, "threshold": ctrl.threshold, "z": ctrl.z,
            "horizon": ctrl.horizon, "q": f.q, "r": f.r, "slope_var0": f.slope_var0, **c}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--settings", default="ce t=0.7,ce,ce fitted t=0.7,ce fitted t=0.9")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model_dir = session.resolve_model_dir(args.model)
    train_config = session.read_train_config(model_dir)
    task_set = task_set_of(None, train_config)
    tasks = choose_tasks(task_set, args.tasks, train_config)
    instances = make_instances(tasks, args.n, args.seed)
    model = session.load(model_dir)
    tok = model.require_tokenizer()
    width = max(prompt_width(tok, insts) for insts in instances.values())
    layout, _ = choose_layout(task_set, tasks, width, model.cfg, model.answer_length)
    items = [(tasks[n], inst) for n in tasks for inst in instances[n]]
    res = []
    print(f"{len(tasks)} tasks x {args.n} (seed {args.seed}), answer {layout.gen_length}, "
          f"block {layout.block_length}", file=sys.stderr)
    print("| setting | z | h | q | r | slope_var0 | content commits | look-ahead extra | "
          "held | fallback | mean NFE |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for st in select(all_settings(), args.settings):
        t0 = time.monotonic()
        r = count(model, tok, items, st, layout, args.batch_size, model.model_dir)
        res.append(r)
        print(f"| {r['setting']} | {r['z']:g} | {r['horizon']} | {r['q']:.3g} | {r['r']:.3g} | "
              f"{r['slope_var0']:.3g} | {r['commits']} | {r['lookahead']} | {r['held']} | "
              f"{r['fallback']} | {r['nfe'] / r['answers']:.2f} |", flush=True)
        print(f"  {st.label}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
