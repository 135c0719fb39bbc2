"""The docs site: ``mkdocs build --strict`` (what scripts/docs.sh runs) passes and renders the
API reference from the docstrings, with the example the guide includes."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings_handlers.python", "griffe")
MISSING = [m for m in NEEDED if importlib.util.find_spec(m.split(".")[0]) is None]
needs_mkdocs = pytest.mark.skipif(bool(MISSING), reason=f"{MISSING} not installed: "
                                  "scripts/docs.sh installs the [docs] extra")


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


@pytest.mark.slow
@needs_mkdocs
def test_docs_build_strict_and_render_the_api(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for page in ["guide/own-loop", "guide/own-task-torchrun", "guide/own-task-simulator",
                 "guide/checkpoints", "guide/dead-peers", "guide/run-directory", "errors",
                 "api/attach", "api/algorithms", "api/comm", "api/topology", "api/tasks",
                 "api/data", "api/metrics", "api/records"]:
        assert (site / page / "index.html").is_file(), page
    api = _text(site / "api" / "attach" / "index.html")
    # the signature and the Args section of attach, rendered as a parameter table
    assert "attach(" in api and "buffers" in api and "Parameters:" in api
    assert "load_state_dict" in api  # Attached's methods
    algorithms = _text(site / "api" / "algorithms" / "index.html")
    assert "outer learning rate." in algorithms  # NoLoCoConfig's Args, split into entries
    for page in site.rglob("*.html"):  # no raw Sphinx role anywhere
        assert not re.search(r":(class|func|meth|mod):`", page.read_text()), page
    guide = _text(site / "guide" / "own-loop" / "index.html")
    assert "gossip.attach(model, optimizer, config(sync_every=args.sync_every))" in guide


@needs_mkdocs
def test_docstring_rewrites() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from docs_roles import indent_leading_section, strip_roles
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert strip_roles("a :class:`gossip.flat.FlatParams` b :meth:`~x.Y.step`") == \
        "a `gossip.flat.FlatParams` b `step`"
    assert indent_leading_section("Args:\nh: steps.\nmore. b: x.\n\nTail.") == \
        "Args:\n    h: steps.\n        more.\n    b: x.\n\nTail."
    assert indent_leading_section("Summary.\n\nArgs:\n    h: x.") == "Summary.\n\nArgs:\n    h: x."
