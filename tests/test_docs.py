"""The documentation site builds with --strict (broken links, missing pages and bad API refs fail)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(mkdocs).exists():
        pytest.fail("mkdocs is not installed; install the docs extra: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_component_table_matches_discovery():
    """docs/components.md states what each component resolves to; keep it true."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_model

    import reftlib

    text = (ROOT / "docs" / "components.md").read_text()
    for family, expected in {"gpt2": "attn.c_proj", "opt": "self_attn.out_proj", "falcon": "self_attention.dense",
                             "gpt_neox": "attention.dense", "bert": "attention.output.dense"}.items():
        site = reftlib.resolve_site(tiny_model(family), 0, "head_output")
        assert site.path.endswith(expected) and f"`{expected}` in" in text
