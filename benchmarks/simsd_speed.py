"""SimSD speed: one verification forward against one plain block step, and end-to-end tokens/s
with a fixed acceptance pattern against fixed-tokens-per-step decoding.

    PYTHONPATH=. python benchmarks/simsd_speed.py --out $OUT            # GPU: SDAR-8B shapes
    PYTHONPATH=. python benchmarks/simsd_speed.py --tiny --out /tmp/simsd   # CPU smoke test

Model: SDAR-8B shapes (Qwen3-8B: 36 layers, hidden 4096, 32 q / 8 kv heads of 128, MLP
12288, vocabulary 151936, q/k norms, block-causal with block 4), random bf16 weights made on
the device, per-layer layout (`models.decode_layout`). Answer blocks of 4 (`--block`).

Sections (printed as they finish, JSON lines in OUT/simsd_speed.jsonl, a table at the end):
  forward   ms per jitted call (median of bursts of 4 queued calls) of the plain block step of
            each kind (none = full forward; refresh = full forward that rebuilds the cache;
            dual / prefix = cached step) and of the verification forward that replaces it in
            a SimSD loop (`speculative_step.verify_logits`: Lb groups of the region, the
            acceptance, the next drafts' logits), and their ratio.
  generate  answer tokens/s of `decode.generate` (B rows x G tokens / wall time, compile
            excluded): simsd with a FIXED acceptance pattern (`--accept K,...`: every
            verification accepts K drafts whatever the weights say, so it commits
            min(K + 1, masked) tokens; random weights would accept ~none), low_confidence at
            the same committed tokens per forward (steps = G / tpf, the nearest schedule),
            and left_to_right (one token per forward). NFE from the decode's stats.
Throughput counts answer tokens only. Nothing here measures acceptance rates: those depend on
the model (`dllm-jax bench quality`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import random_params
from controllers import make_controller
from dllm_jax import decode as D
from dllm_jax import decode_step as DS
from dllm_jax import models as M
from dllm_jax import speculative as SP
from dllm_jax import speculative_step as SPS
from dllm_jax.config import GenerateConfig, ModelConfig
from dllm_jax.state import Drafts

OUT = "."
T0 = time.perf_counter()
REAL_ACCEPT = SPS.accept


def log(section: str, **rec: Any) -> dict:
    rec = {"section": section, **rec}
    with open(os.path.join(OUT, "simsd_speed.jsonl"), "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    return rec


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def make_params(cfg: ModelConfig, dtype: Any) -> Any:
    """Random params made on the device in `dtype`, in the decode layout."""
    return random_params(jax.eval_shape(M.decode_layout, M.param_shapes(cfg, dtype)))


def median_ms(fn: Callable[[], Any], reps: int, burst: int = 4) -> float:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready([fn() for _ in range(burst)])
        ts.append((time.perf_counter() - t) * 1e3 / burst)
    return statistics.median(ts)


# ----------------------------------------------------------------------------- forward
def forward_section(cfg, params, b, p, g, lb, reps) -> list[dict]:
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, cfg.vocab_size - 2, size=(b, p)).astype(np.int32)
    answer = np.full((b, g), cfg.mask_token_id, np.int32)
    answer[:, :lb] = rng.integers(2, cfg.vocab_size - 2, size=(b, lb))   # block 0 decoded
    tokens = jnp.asarray(np.concatenate([prompt, answer], axis=1))
    valid = jnp.ones(tokens.shape, bool)
    pos = M.default_positions(valid)
    start = jnp.int32(p + lb)                                             # block 1 active
    block = tokens[:, p + lb:p + 2 * lb]
    drafts = Drafts(token=jnp.asarray(rng.integers(2, 100, size=(b, lb)), jnp.int32),
                    score=jnp.zeros((b, lb), jnp.float32))
    seq = DS.Sequence(tokens, pos, valid)
    spec = SP.Verify()
    recs = []
    for kind in ("none", "refresh", "dual", "prefix"):
        mode = "none" if kind == "none" else ("dual" if kind == "refresh" else kind)
        gen = GenerateConfig(gen_length=g, block_length=lb, steps=g, cache=mode)
        cache = None if mode == "none" else M.apply_refresh(
            params, cfg, tokens, pos, valid, jnp.broadcast_to(start + jnp.arange(lb), (b, lb)))[1]
        vkind = {"none": "whole", "refresh": "refresh"}.get(kind, "cached")

        @jax.jit
        def plain(c, gen=gen, kind=kind):
            if kind == "none" or kind == "refresh":
                return DS.block_logits(params, cfg, gen, seq, c, start, jnp.int32(0), None,
                                       kind == "refresh")
            return DS.cached_logits(params, cfg, gen, seq, c, start, None)

        @jax.jit
        def verify(c, gen=gen, vkind=vkind):
            return SPS.verify_logits(params, cfg, gen, spec, tokens, pos, valid, c, start, block,
                                     drafts, jax.random.key(1), None, None, vkind)

        t_plain = median_ms(lambda: plain(cache), reps)
        t_ver = median_ms(lambda: verify(cache), reps)
        rec = log("forward", b=b, p=p, g=g, block=lb, kind=kind, plain_ms=t_plain,
                  verify_ms=t_ver, ratio=t_ver / t_plain)
        recs.append(rec)
        say(f"forward B{b} {kind:7s} plain {t_plain:8.2f} ms  verify {t_ver:8.2f} ms  "
            f"x{t_ver / t_plain:.2f}")
    return recs


# ----------------------------------------------------------------------------- generate
def fixed_accept(k: int) -> Callable[..., Any]:
    """An acceptance rule that accepts k drafts at every verification whatever the logits
    say (speed runs only: the committed tokens are not the model's decode)."""
    def accept(rule, rank, masked, drafts, logits, draft_logq, key, temperature, eos_id=-1):
        n = jnp.sum(masked, axis=-1, dtype=jnp.int32)
        a = jnp.minimum(jnp.int32(k), n)
        verified = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        keep = masked & (rank <= jnp.minimum(a, n - 1)[:, None])
        return a, jnp.where(keep, jnp.where(rank < a[:, None], drafts, verified), -1)
    return accept


def run_generate(cfg, params, b, p, g, gen, ctrl, name, patch=None) -> dict:
    SPS.accept = patch or REAL_ACCEPT
    jax.clear_caches()                                   # the patch changes the program
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(2, cfg.vocab_size - 2, size=(b, p)).astype(np.int32))
    args = (params, prompt, jnp.ones((b, p), bool), jax.random.key(0), ctrl)
    t = time.perf_counter()
    compiled = D._generate_jit.lower(*args, model_cfg=cfg, gen_cfg=gen).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    dt = time.perf_counter() - t
    SPS.accept = REAL_ACCEPT
    nfe = int(np.asarray(out.stats.nfe).max())
    rec = log("generate", name=name, b=b, p=p, g=g, block=gen.block_length, cache=gen.cache,
              nfe=nfe, tpf=g / nfe, seconds=dt, tok_s=b * g / dt, ms_per_forward=dt / nfe * 1e3,
              compile_s=compile_s)
    say(f"gen B{b} {gen.cache:6s} {name:22s} {rec['tok_s']:9.1f} tok/s  NFE {nfe:4d} "
        f"(TPF {g / nfe:.2f}, {rec['ms_per_forward']:.2f} ms/forward, compile {compile_s:.0f}s)")
    return rec


def generate_section(cfg, params, b, p, g, lb, caches, accepts) -> list[dict]:
    recs = []
    simsd, ltr, lowc = (make_controller("simsd"), make_controller("left_to_right"),
                        make_controller("low_confidence"))
    for cache in caches:
        mk = lambda steps: GenerateConfig(gen_length=g, block_length=lb, steps=steps,  # noqa
                                          cache=cache)
        recs.append(run_generate(cfg, params, b, p, g, mk(g), ltr, "left_to_right"))
        for k in accepts:
            r = run_generate(cfg, params, b, p, g, mk(g), simsd, f"simsd accept {k}",
                             fixed_accept(k))
            recs.append(r)
            tpf = g / r["nfe"]                           # the nearest fixed schedule
            per_block = min((d for d in range(1, lb + 1) if lb % d == 0),
                            key=lambda d: abs(d - tpf))
            recs.append(run_generate(cfg, params, b, p, g, mk(g // per_block), lowc,
                                     f"low_confidence {per_block}/step"))
    return recs


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/simsd_speed"))
    ap.add_argument("--block", type=int, default=4, help="answer block length (= SDAR block)")
    ap.add_argument("--batches", default="1,32", help="batch sizes, e.g. 1,32")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--caches", default="dual,prefix,none", help="cache modes of the decodes")
    ap.add_argument("--accept", default="3,1,0",
                    help="fixed accepted drafts per verification, e.g. 3 (= 4 of a block of 4)")
    ap.add_argument("--skip", default="", help="sections to skip: forward,generate")
    args = ap.parse_args()
    OUT = args.out
    os.makedirs(OUT, exist_ok=True)
    lb = args.block
    if args.tiny:
        cfg = ModelConfig.tiny("sdar", vocab_size=256, mask_token_id=255, block_size=lb)
        params = M.init_params(cfg, jax.random.key(0))
        batches, p, g, reps = [1], 8, 16, 3
    else:
        cfg, reps = ModelConfig.sdar_8b(lb), 20
        params = make_params(cfg, jnp.bfloat16)
        batches, p, g = [int(x) for x in args.batches.split(",")], args.prompt, args.gen
    say(f"{jax.devices()[0].device_kind}; {cfg.arch} {cfg.num_layers}L h{cfg.hidden_size}, "
        f"block {lb}, P{p} G{g}, batches {batches}")
    skip = set(args.skip.split(",")) - {""}
    fwd, gen = [], []
    for b in batches:
        if "forward" not in skip:
            fwd += forward_section(cfg, params, b, p, g, lb, reps)
        if "generate" not in skip:
            gen += generate_section(cfg, params, b, p, g, lb, args.caches.split(","),
                                    [int(k) for k in args.accept.split(",")])
    print("\n| B | kind | plain step ms | verification ms | ratio |\n|---|---|---|---|---|")
    for r in fwd:
        print(f"| {r['b']} | {r['kind']} | {r['plain_ms']:.2f} | {r['verify_ms']:.2f} | "
              f"{r['ratio']:.2f} |")
    print("\n| B | cache | decode | NFE | TPF | tok/s | ms/forward |\n" + "|---" * 7 + "|")
    for r in gen:
        print(f"| {r['b']} | {r['cache']} | {r['name']} | {r['nfe']} | {r['tpf']:.2f} | "
              f"{r['tok_s']:.1f} | {r['ms_per_forward']:.2f} |")


if __name__ == "__main__":
    main()
