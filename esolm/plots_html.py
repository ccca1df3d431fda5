"""An offline page for ``dvc plots show``: DVC's HTML template with the vega, vega-lite and
vega-embed bundles inlined, so that the training curves (``reports/curves/<variant>.csv``) draw on
a machine without a network (``make plots``, then open ``reports/plots/index.html``).

DVC's default page loads the three bundles from a CDN, and without one its vega plots are blank.
A template given to ``dvc plots show --html-template PATH`` (or the config key
``plots.html_template``, a path relative to ``.dvc/``) must hold ``{plot_divs}``, where DVC puts
each plot's ``<div>``; DVC also replaces ``{scripts}`` with every renderer's ``<script src>``
tags and ``{refresh_tag}`` with its refresh ``<meta>``. This template keeps ``{plot_divs}`` and
``{refresh_tag}`` and leaves out ``{scripts}``, so no renderer adds a script from the network;
the bundles themselves are inlined. They come from ``web/``: exact versions in
``web/package.json``, their sha512 hashes in ``web/package-lock.json``, installed by
``npm ci --ignore-scripts`` (npm checks each download against its hash).

``python -m esolm.plots_html [--node-modules DIR] [--out FILE]`` writes the template
(default ``.dvc/tmp/plots-offline.html``, git-ignored; ``dvc config --local plots.html_template
tmp/plots-offline.html`` makes plain ``dvc plots show`` and ``dvc plots diff`` use it too).
Imports no torch: it runs on any install.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

NODE_MODULES = Path("web/node_modules")
TEMPLATE = Path(".dvc/tmp/plots-offline.html")
# (package, its minified browser bundle), in load order: vega-lite needs vega, vega-embed both
BUNDLES = (("vega", "build/vega.min.js"), ("vega-lite", "build/vega-lite.min.js"),
           ("vega-embed", "build/vega-embed.min.js"))
FIX = "run `make plots`, or `npm ci --ignore-scripts --omit=optional --prefix web`"
# what DVC's template engine replaces (a plain str.replace over the whole page, bundles included)
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
{bundles}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""

_END_TAG = re.compile(r"</(script)", re.IGNORECASE)
_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.MULTILINE)


def inline_script(js: str) -> str:
    """``js`` made safe to sit between ``<script>`` and ``</script>`` with the same meaning:
    ``</script`` (any case) becomes ``<\\/script``, which ends no element and reads as ``</script``
    in a JavaScript string, regular expression or template; ``<!--``, which could put the HTML
    parser into a state where ``</script>`` no longer ends the element, becomes ``<\\x21--``
    (``!`` again to JavaScript); the trailing ``//# sourceMappingURL=`` comment is dropped (the
    map is not inlined)."""
    js = _SOURCE_MAP.sub("", js)
    js = _END_TAG.sub(r"<\\/\1", js)
    return js.replace("<!--", "<\\x21--")


def read_bundle(node_modules: Path, package: str, bundle: str) -> tuple[str, str]:
    """``(version, source)`` of one installed bundle; a missing file is a FileNotFoundError that
    names it and the fix; a bundle holding one of DVC's placeholders (which DVC would replace
    inside the script) is a ValueError."""
    path = node_modules / package / bundle
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {FIX}")
    meta = node_modules / package / "package.json"
    version = json.loads(meta.read_text(encoding="utf-8")).get("version", "?") if meta.is_file() else "?"
    source = path.read_text(encoding="utf-8")
    if found := [p for p in PLACEHOLDERS if p in source]:
        raise ValueError(f"{path} contains {found[0]}, which DVC would replace inside the script: "
                         "pin another version in web/package.json")
    return version, source


def render_template(node_modules: str | Path = NODE_MODULES) -> str:
    """The template's text: DVC's default page with ``{scripts}`` replaced by the three bundles
    of ``node_modules``, each in its own ``<script>`` after a comment naming its version."""
    node_modules = Path(node_modules)
    tags = []
    for package, bundle in BUNDLES:
        version, source = read_bundle(node_modules, package, bundle)
        tags.append(f"    <!-- {package} {version} ({bundle}) -->\n"
                    f"    <script type=\"text/javascript\">\n{inline_script(source)}\n    </script>")
    return PAGE.replace("{bundles}", "\n".join(tags))


def build_template(node_modules: str | Path = NODE_MODULES, out: str | Path = TEMPLATE) -> Path:
    """Write the template to ``out`` (atomically: a temporary file beside it, then a rename) and
    return its path."""
    out = Path(out)
    text = render_template(node_modules)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m esolm.plots_html``: write the template and print its path; an error is one
    line on stderr and exit code 2."""
    p = argparse.ArgumentParser(prog="python -m esolm.plots_html", description=__doc__.split("\n\n")[0])
    p.add_argument("--node-modules", default=str(NODE_MODULES),
                   help=f"the installed bundles (default {NODE_MODULES})")
    p.add_argument("--out", default=str(TEMPLATE), help=f"the template to write (default {TEMPLATE})")
    args = p.parse_args(argv)
    try:
        print(build_template(args.node_modules, args.out))
    except (OSError, ValueError) as err:
        print(f"{p.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
