"""An independent, step-by-step reference of R2-dLLM's added rules (GATECH-EIC/R2-dLLM,
`llada/generate.py`: `_run_window_sweep`, `_apply_temporal_consistency`, `maybe_auto_confirm`),
in plain Python loops over one row at a time, written from their code and the issue's reading.

`R2Reference(...)` is called after the threshold rule's write of every step with the block's
views (the `after_step` hook of `reference_decoders.fastdllm_generate` and
`reference_cached.fastdllm_generate_cached`), and writes its own commits into the block.
"""

from __future__ import annotations


import numpy as np


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class R2Reference:
    """Rules 2-4 of R2 on `[B, Lb]` block views (rule 1 is Fast-dLLM's threshold, done by the
    reference loop itself). Options as `controllers.r2.R2`; token_cluster 'confidence' | 'mid'."""

    def __init__(self, mask_id: int, window: int = 3, spatial_threshold: float = 0.8,
                 max_unmasked: int = 1, token_cluster: str = "confidence", cluster_size: int = 2,
                 temporal_steps: int = 3, temporal_threshold: float = 0.8,
                 temporal_eval: str = "last") -> None:
        self.mask_id = mask_id
        self.window, self.spatial, self.cap = window, spatial_threshold, max_unmasked
        self.mode, self.cluster_size = token_cluster, cluster_size
        self.steps, self.t_thr, self.t_eval = temporal_steps, temporal_threshold, temporal_eval
        self.block = None
        self.fired = {"window": 0, "cluster": 0, "temporal": 0}

    # -- rule 2 ------------------------------------------------------------------------------
    def window_sweep(self, xb: np.ndarray, x0b: np.ndarray, confb: np.ndarray) -> None:
        lb = xb.shape[1]
        w = self.window
        if w <= 0 or lb < w:
            return
        decode = np.zeros(xb.shape, bool)
        for r in range(xb.shape[0]):
            for s in range(lb - w + 1):
                toks = xb[r, s:s + w]
                if self.cap >= 0 and int((toks != self.mask_id).sum()) > self.cap:
                    continue
                m = toks == self.mask_id
                if not m.any():
                    continue
                vals = confb[r, s:s + w][m]
                if not np.isfinite(vals).all():
                    continue
                if float(vals.mean()) >= self.spatial:
                    decode[r, s:s + w] |= m
        xb[decode] = x0b[decode]
        self.fired["window"] += int(decode.sum())

    # -- rule 3 ------------------------------------------------------------------------------
    def token_clusters(self, xb: np.ndarray, top_ids: np.ndarray, top_conf: np.ndarray) -> None:
        if self.window <= 0 or self.mode == "none":
            return
        lb = xb.shape[1]
        for r in range(xb.shape[0]):
            pos = 0
            while pos < lb:
                if xb[r, pos] != self.mask_id:
                    pos += 1
                    continue
                tok, s = int(top_ids[r, pos]), pos
                pos += 1
                while pos < lb and xb[r, pos] == self.mask_id and int(top_ids[r, pos]) == tok:
                    pos += 1
                if pos - s < self.cluster_size:
                    continue
                c = top_conf[r, s:pos]
                if float(c.max()) <= self.spatial:
                    continue
                rel = int(np.argmax(c)) if self.mode == "confidence" else (pos - s) // 2
                xb[r, s + rel] = tok
                self.fired["cluster"] += 1

    # -- rule 4 ------------------------------------------------------------------------------
    def temporal(self, xb: np.ndarray, cand_mask: np.ndarray, top_ids: np.ndarray,
                 top_conf: np.ndarray) -> None:
        if self.steps <= 0:
            return
        b, lb = xb.shape
        for r in range(b):
            if not cand_mask[r].any():
                self.ids[r], self.count[r], self.total[r], self.peak[r] = -1, 0, 0.0, 0.0
                continue
            for i in range(lb):
                if not cand_mask[r, i]:
                    continue
                if xb[r, i] != self.mask_id:       # committed by rules 1-3 this step
                    self.ids[r, i], self.count[r, i] = -1, 0
                    self.total[r, i], self.peak[r, i] = 0.0, 0.0
                    continue
                c, t = float(top_conf[r, i]), int(top_ids[r, i])
                if self.ids[r, i] == t:
                    self.count[r, i] += 1
                    self.total[r, i] += c
                    self.peak[r, i] = max(self.peak[r, i], c)
                else:
                    self.ids[r, i], self.count[r, i] = t, 1
                    self.total[r, i], self.peak[r, i] = c, c
                if self.count[r, i] < self.steps:
                    continue
                value = {"ave": self.total[r, i] / self.count[r, i], "last": c,
                         "max": self.peak[r, i]}[self.t_eval]
                if value >= self.t_thr:
                    xb[r, i] = t
                    self.fired["temporal"] += 1
                    self.ids[r, i], self.count[r, i] = -1, 0
                    self.total[r, i], self.peak[r, i] = 0.0, 0.0

    def __call__(self, xb: np.ndarray, x0b: np.ndarray, confb: np.ndarray,
                 logits_b: np.ndarray, cand_mask: np.ndarray, block: int) -> None:
        if block != self.block:                     # a new block: no streaks yet
            self.block = block
            shape = xb.shape
            self.ids = np.full(shape, -1, np.int64)
            self.count = np.zeros(shape, np.int64)
            self.total = np.zeros(shape, np.float64)
            self.peak = np.zeros(shape, np.float64)
        probs = softmax64(np.asarray(logits_b, np.float64))
        top_ids, top_conf = probs.argmax(-1), probs.max(-1)
        self.window_sweep(xb, x0b, confb)
        self.token_clusters(xb, top_ids, top_conf)
        self.temporal(xb, cand_mask, top_ids, top_conf)


__all__ = ["R2Reference", "softmax64"]
