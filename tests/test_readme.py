"""What README promises, run as README writes it: the Python snippet under "Generate" works on
a model folder at `~/models/llada-8b` (here the bundled model copied into a temporary HOME,
with a 32-token answer that fits its 64 positions)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from dllm_jax import session

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_snippet_runs(tmp_path: Path, monkeypatch) -> None:
    [code] = [b for b in _python_blocks() if "session.load(" in b]
    home = tmp_path / "home"
    shutil.copytree(session.resolve_model_dir(None), home / "models" / "llada-8b")
    monkeypatch.setenv("HOME", str(home))
    # a converted LLaDA folder carries its chat template; give the copy a plain one
    tc = home / "models" / "llada-8b" / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "chat_template":
                              "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    # a real prompt for the bundled task model instead of the placeholder
    code = code.replace('"...prompt..."', '"sort: 9 4 7 1"')
    # the bundled model's 64 positions cannot hold README's 256-token answer; same code, 32
    sizes = "gen_length=256, block_length=32, steps=256"
    assert sizes in code
    code = code.replace(sizes, "gen_length=32, block_length=32, steps=32")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - README's own code
    a, out = ns["a"], ns["out"]
    assert a.text == "1 4 7 9" and a.nfe >= 1
    assert np.asarray(out.tokens).shape == (1, 32)
    assert int(np.asarray(out.stats.nfe)[0]) >= 1
