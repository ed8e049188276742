"""Declarative key maps: Hugging Face tensor names -> dllm_jax param paths, with transform chains.

The key map of a model family is made from its params table (`dllm_jax.models`, each
`Weight` names its Hugging Face tensor) by `keymap_for`. A key map is a table of `Rule`s,
one per HF tensor name pattern:

    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers/q_proj", ("transpose",), when="...")

- `{i}` stands for the layer index; the tensor goes to row `i` of the stacked `[L, ...]` param
  (or, for a param of a layer group, to the row of layer `i` in that group's stack: rules of
  different groups may share a name pattern, each matching the layers of its group).
- `transforms` is a chain applied to the source tensor, in order. Each transform also maps the
  destination index of a block of source rows, so tensors are copied block by block without a
  full-size intermediate. `"transpose"` reverses all axes (PyTorch Linear `[out, in]` ->
  `[in, out]`); `"transpose_inner"` swaps the last two (a stack of Linear weights
  `[E, out, in]` -> `[E, in, out]`).
- `target=None` marks a known tensor that is deliberately not converted (e.g. the LM head of a
  model with tied embeddings); `ignore` patterns (regular expressions) list known non-parameter
  buffers such as `rotary_emb.inv_freq`; `dropped` patterns list known tensors left out with
  a notice (`convert` reports how many), such as a vision tower.
- `when` names a boolean ModelConfig field (`"!field"` for its negation) that must hold for the
  rule to apply; e.g. q/k/v biases exist only when `qkv_bias`.

`plan()` matches a checkpoint's tensor names against the table and checks that every expected
tensor is present exactly once with the expected shape, and that nothing unknown is left over.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

from checkpoints_convert.hf import TensorInfo
from dllm_jax.checkpoint import CheckpointError
from dllm_jax.config import ModelConfig
from dllm_jax.models import Family, param_shapes
from dllm_jax.models.params import condition_holds

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A shape-changing view applied to source blocks.

    Attributes:
      name: the name used in rule tables.
      shape: source shape -> transformed shape.
      apply: (destination index of the block, block) -> (transformed index, transformed block).
    """

    name: str
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    apply: Callable[[Index, np.ndarray], tuple[Index, np.ndarray]]


TRANSFORMS: dict[str, Transform] = {
    "transpose": Transform(
        "transpose",
        shape=lambda s: tuple(reversed(s)),
        apply=lambda idx, x: (tuple(reversed(idx)), np.transpose(x)),
    ),
    "transpose_inner": Transform(
        "transpose_inner",
        shape=lambda s: (*s[:-2], s[-1], s[-2]),
        apply=lambda idx, x: ((*idx[:-2], idx[-1], idx[-2]), np.swapaxes(x, -1, -2)),
    ),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of a key map: HF name pattern -> our param path (see the module docstring)."""

    hf: str
    target: str | None
    transforms: tuple[str, ...] = ()
    when: str | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown transforms {unknown} in rule {self.hf}")

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(\d+)") + "$")

    def name(self, layer: int | None) -> str:
        return self.hf.replace("{i}", str(layer)) if self.per_layer else self.hf

    def applies(self, cfg: ModelConfig) -> bool:
        return condition_holds(self.when, cfg)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """All rules of one architecture plus the regexes of known buffers to skip.

    `rows` gives the layer indices of each layer group (`Family.rows`); `dropped` holds
    (regex, what they are) of known tensors not converted, with a notice."""

    arch: str
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    rows: Callable[[ModelConfig], Mapping[str, tuple[int, ...]]] | None = None

    def layer_rows(self, cfg: ModelConfig) -> Mapping[str, tuple[int, ...]]:
        out = {"layers": tuple(range(cfg.num_layers))}
        if self.rows is not None:
            out.update(self.rows(cfg))
        return out


def _group(rule: Rule) -> str:
    return rule.target.split("/", 1)[0] if rule.target and "/" in rule.target else "layers"


def keymap_for(family: Family) -> KeyMap:
    """The key map of a model family, read off its params table: one rule per converted
    weight (PyTorch `[out, in]` Linear weights transposed), plus the family's skipped
    tensors and ignored buffers."""
    rules = [Rule(w.hf, w.path, (("transpose",) if w.transposed else ()) + w.transforms,
                  when=w.when)
             for w in family.weights if w.hf is not None]
    rules += [Rule(hf, None, when=when) for hf, when in family.hf_skip]
    return KeyMap(arch=family.arch, rules=tuple(rules), ignore=family.hf_ignore,
                  dropped=family.hf_dropped, rows=family.rows)


def dropped_tensors(keymap: KeyMap, names: Iterable[str]) -> dict[str, int]:
    """`{what: count}` of the tensors among `names` that the key map drops with a notice."""
    out: dict[str, int] = {}
    pats = [(re.compile(rx), what) for rx, what in keymap.dropped]
    for name in names:
        what = next((w for rx, w in pats if rx.match(name)), None)
        if what is not None:
            out[what] = out.get(what, 0) + 1
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one source tensor goes: param path, layer row (or None) and transform chain."""

    info: TensorInfo
    path: tuple[str, ...]
    layer: int | None
    transforms: tuple[Transform, ...]


def _lookup(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _show(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _where(tensors: Mapping[str, TensorInfo]) -> str:
    files = sorted({i.file for i in tensors.values()})
    if len(files) == 1:
        return str(files[0])
    return f"the checkpoint in {files[0].parent} ({len(files)} weight files)" if files else "the checkpoint"


def plan(cfg: ModelConfig, keymap: KeyMap, tensors: Mapping[str, TensorInfo]) -> list[Placement]:
    """Match every source tensor to its destination and validate the whole checkpoint.

    Raises CheckpointError naming the tensors and files when a tensor is unknown, an expected
    one is missing, or a shape differs from what `param_shapes(cfg)` requires.
    """
    shapes = param_shapes(cfg)
    rows = keymap.layer_rows(cfg)
    rules = [r for r in keymap.rules if r.applies(cfg)]
    compiled = [(r, r.regex()) for r in rules]
    ignore = [re.compile(p) for p in keymap.ignore] + [re.compile(p) for p, _ in keymap.dropped]

    def fits(rule: Rule, m: re.Match[str]) -> bool:
        if not rule.per_layer:
            return True
        layer = int(m.group(1))
        if rule.target is None:
            return layer < cfg.num_layers
        return layer in rows[_group(rule)]

    placements: list[Placement] = []
    seen: set[tuple[str, int | None]] = set()
    unexpected: list[str] = []
    for name, info in sorted(tensors.items()):
        match = next(((r, m) for r, rx in compiled if (m := rx.match(name)) and fits(r, m)),
                     None)
        if match is None:
            if not any(p.match(name) for p in ignore):
                unexpected.append(f"{name} (in {info.file.name})")
            continue
        rule, m = match
        layer = int(m.group(1)) if rule.per_layer else None
        seen.add((rule.hf, layer))
        if rule.target is None:
            continue
        row = None if layer is None else rows[_group(rule)].index(layer)
        placements.append(
            Placement(info, tuple(rule.target.split("/")), row,
                      tuple(TRANSFORMS[t] for t in rule.transforms))
        )
    where = _where(tensors)
    if unexpected:
        raise CheckpointError(
            f"{where} has tensors that the {keymap.arch} key map does not know: "
            f"{_show(unexpected)}; this is not a {keymap.arch} checkpoint with the layout of its "
            f"config.json (num_layers={cfg.num_layers}), or it needs a newer converter."
        )
    missing = [
        r.name(layer)
        for r in rules if r.target is not None
        for layer in (rows[_group(r)] if r.per_layer else [None])
        if (r.hf, layer) not in seen
    ]
    if missing:
        raise CheckpointError(
            f"{where} lacks tensors that config.json implies: {_show(missing)}; the download is "
            f"incomplete or config.json belongs to another model."
        )
    for p in placements:
        want = _lookup(shapes, p.path).shape
        want = want[1:] if p.layer is not None else want
        got = p.info.shape
        for t in p.transforms:
            got = t.shape(got)
        if tuple(got) != tuple(want):
            # express the expected shape in the source layout: undo the chain
            src_want = tuple(want)
            for t in reversed(p.transforms):
                src_want = t.shape(src_want)
            raise CheckpointError(
                f"tensor {p.info.name} in {p.info.file} has shape {list(p.info.shape)} but "
                f"config.json implies {list(src_want)}; the weights and config.json do not belong "
                f"to the same model."
            )
    return placements


def check_coverage(cfg: ModelConfig, keymap: KeyMap) -> None:
    """Assert the table fills every param of `param_shapes(cfg)` exactly once (a table bug otherwise)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))
    leaves = {"/".join(str(k.key) for k in path) for path, _ in flat}
    targets = [r.target for r in keymap.rules if r.applies(cfg) and r.target is not None]
    if sorted(targets) != sorted(leaves):
        raise AssertionError(
            f"{keymap.arch} key map targets {sorted(targets)} but the params are {sorted(leaves)}"
        )
