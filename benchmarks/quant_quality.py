"""int8 weight-only quantisation (dllm_jax/quant.py) against bf16 and float32 on the bundled
model: logits agreement over task prompts, and greedy task accuracy.

    PYTHONPATH=. python benchmarks/quant_quality.py [--per-task 16] [--seed 0]

Variants, all loaded with `session.load()` (the bundled model, stored in float32):
  f32        the stored weights;
  bf16       weights and activations in bfloat16 (`dtype="bfloat16"`);
  int8       int8 matrices (q/k/v/o, gate/up/down, lm_head; per output channel), bfloat16
             activations and other params (`dtype="bfloat16", quantize="int8"`);
  int8-f32   int8 matrices, float32 activations (`quantize="int8"`).
Canvases: test-split instances of every v1 task, prompt + answer (32 + 32 tokens) with the
answer fully masked (a decode's first forward) or half masked at random (the rest the
reference answer). On the masked positions, per pair of variants: top-1 agreement (argmax
equal), and max / mean |difference| of log-softmax over the whole vocabulary. Then a greedy
decode of every prompt (low_confidence, 32 tokens, 32 steps) and the fraction of valid
answers per variant. Speed is not measured (CPU only).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from controllers import make_controller
from dllm_jax import models, quant, session
from dllm_jax.config import GenerateConfig
from dllm_jax.tasks import TASKS
from dllm_jax.train.data import encode_instances

VARIANTS = {"f32": {}, "bf16": {"dtype": "bfloat16"},
            "int8": {"dtype": "bfloat16", "quantize": "int8"},
            "int8-f32": {"quantize": "int8"}}
PAIRS = (("bf16", "f32"), ("int8", "bf16"), ("int8", "f32"), ("int8-f32", "f32"))


def _bytes(params) -> int:
    return sum(int(a.nbytes) for a in jax.tree.leaves(params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-task", type=int, default=16, help="test instances per task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()

    sessions = {k: session.load(**kw) for k, kw in VARIANTS.items()}
    s = sessions["f32"]
    cfg = s.cfg
    plen = alen = s.answer_length or 32
    insts = [i for t in TASKS.values() for i in t.generate(args.seed, args.per_task, split="test")]
    prompts, answers = encode_instances(insts, plen, alen)
    n = len(insts)
    valid = np.concatenate([prompts != s.pad_id, np.ones((n, alen), bool)], 1)
    qidx = jnp.broadcast_to(plen + jnp.arange(alen, dtype=jnp.int32), (n, alen))

    rng = np.random.default_rng(args.seed)
    canvases = {"answer fully masked": np.ones((n, alen), bool),
                "answer half masked": rng.random((n, alen)) < 0.5}

    @jax.jit
    def logprobs(params, tokens):
        logits = models.apply(params, cfg, tokens, key_valid=jnp.asarray(valid), query_idx=qidx)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    print(f"bundled model {s.model_dir.name}: {cfg.num_layers} layers, D={cfg.hidden_size}, "
          f"V={cfg.vocab_size}; {n} test prompts ({args.per_task} per task x {len(TASKS)} "
          f"tasks), {plen} prompt + {alen} answer tokens")
    print("\nparams bytes: " + ", ".join(f"{k} {_bytes(v.params) / 2**20:.2f} MiB"
                                         for k, v in sessions.items()))
    print(f"quantised: {', '.join(quant.quantized_paths(sessions['int8'].params))}")

    for cname, masked in canvases.items():
        tokens = jnp.asarray(np.concatenate(
            [prompts, np.where(masked, cfg.mask_token_id, answers)], 1))
        lp = {k: np.asarray(logprobs(v.params, tokens)) for k, v in sessions.items()}
        sel = masked                                     # [n, alen] the masked positions
        print(f"\n{cname} ({int(sel.sum())} masked positions)")
        print(f"{'pair':<18}{'top-1 agree':>12}{'max |dlogp|':>13}{'mean |dlogp|':>14}"
              f"{'mean |dlogp| top-1':>20}")
        for a, b in PAIRS:
            da, db = lp[a][sel], lp[b][sel]              # [m, V]
            agree = float(np.mean(da.argmax(-1) == db.argmax(-1)))
            diff = np.abs(da - db)
            top = diff[np.arange(len(db)), db.argmax(-1)]   # at the reference's top-1 token
            print(f"{a + ' vs ' + b:<18}{agree:>12.4f}{diff.max():>13.4f}{diff.mean():>14.5f}"
                  f"{top.mean():>20.5f}")

    gen = GenerateConfig(gen_length=alen, block_length=alen, steps=alen)
    ctrl = make_controller("low_confidence")
    print(f"\ngreedy decode (low_confidence, {alen} tokens, {alen} steps): valid answers")
    texts = {}
    for k, v in sessions.items():
        out = v.generate_ids(prompts, prompts != v.pad_id, gen, ctrl, key=jax.random.key(0))
        answers_k = v.answers(out)
        texts[k] = [a.text for a in answers_k]
        ok = np.mean([TASKS[i.task].score(i, a.text).valid for i, a in zip(insts, answers_k)])
        print(f"  {k:<9}{ok:.4f}")
    for a, b in PAIRS:
        same = np.mean([x == y for x, y in zip(texts[a], texts[b])])
        print(f"  identical answers {a} vs {b}: {same:.4f}")
    print(f"\n[{time.perf_counter() - t0:.1f} s on {jax.default_backend()}]")


if __name__ == "__main__":
    main()
