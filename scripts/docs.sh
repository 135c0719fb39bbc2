#!/usr/bin/env bash
# Build the docs site into site/ with mkdocs --strict: a broken link, a missing page or a
# docstring mkdocstrings cannot render fails the build. Installs the [docs] extra into .venv
# when it is missing. Extra arguments go to mkdocs build (e.g. --site-dir /tmp/site).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
if ! .venv/bin/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null; then
    .venv/bin/python -m pip install -q -e ".[docs]"
fi
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict "$@"
echo "docs: $(pwd)/site/index.html"
