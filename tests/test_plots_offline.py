"""The offline ``dvc plots show`` page (esolm/plots_html.py): the template built from fake bundles
(placeholders, inlining, escaping, errors), DVC's renderer filling it; marked slow (and network):
the pinned bundles installed by ``npm ci`` from web/, a DVC repository's page made with them, and
its plot drawn to SVG by those bundles in node."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from esolm.plots_html import BUNDLES, PLACEHOLDERS, build_template, inline_script, main, render_template

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
SCRIPT_SRC = re.compile(r"<script\b[^>]*\bsrc\s*=", re.IGNORECASE)

# a fake bundle per package: each marks itself; vega-lite holds what must be escaped
FAKE = {
    "vega": 'window.vega={marker:"FAKE_VEGA"};\n//# sourceMappingURL=vega.min.js.map\n',
    "vega-lite": 'window.vegaLite={marker:"FAKE_VL",a:"</script>",b:"</SCRIPT >",c:/<!--x/};\n',
    "vega-embed": 'window.vegaEmbed=function(){return "FAKE_EMBED"};\n',
}


class Scripts(HTMLParser):
    """The text of every ``<script>`` element as a browser's parser splits it, with its attributes."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.scripts: list[tuple[dict, str]] = []
        self._open = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append((dict(attrs), ""))
            self._open = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._open = False

    def handle_data(self, data):
        if self._open:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


def fake_node_modules(root: Path, **override: str) -> Path:
    for package, bundle in BUNDLES:
        path = root / package / bundle
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(override.get(package, FAKE[package]))
        (root / package / "package.json").write_text(json.dumps({"name": package, "version": "9.8.7"}))
    return root


def test_the_template_keeps_dvcs_placeholders_but_not_scripts_and_inlines_the_bundles_in_order(tmp_path):
    html = render_template(fake_node_modules(tmp_path / "node_modules"))
    assert html.count("{plot_divs}") == 1 and html.count("{refresh_tag}") == 1
    assert "{scripts}" not in html  # DVC's CDN <script src> tags go there: left out
    assert SCRIPT_SRC.search(html) is None and "http" not in html
    markers = [html.index(m) for m in ("FAKE_VEGA", "FAKE_VL", "FAKE_EMBED")]
    assert markers == sorted(markers), "vega, then vega-lite (needs vega), then vega-embed (needs both)"
    assert all(f"<!-- {package} 9.8.7 ({bundle}) -->" in html for package, bundle in BUNDLES)
    assert "sourceMappingURL" not in html


def test_script_end_tags_and_comment_openers_in_a_bundle_are_escaped(tmp_path):
    """The page parses into exactly the three scripts, each the bundle's text once the escapes are
    read back as JavaScript reads them (``<\\/`` is ``</``, ``\\x21`` is ``!``)."""
    html = render_template(fake_node_modules(tmp_path / "node_modules"))
    scripts = Scripts(html).scripts
    assert len(scripts) == 3 and all(attrs == {"type": "text/javascript"} for attrs, _ in scripts)
    assert len(re.findall(r"</script", html, re.IGNORECASE)) == 3  # the three closing tags only
    assert "<!--x" not in html and r"<\x21--x" in html
    for (_, text), (package, _) in zip(scripts, BUNDLES, strict=True):
        unescaped = text.replace("<\\/", "</").replace("<\\x21--", "<!--").strip()
        assert unescaped == FAKE[package].split("\n//# sourceMappingURL")[0].strip()
    assert inline_script("a</ScRiPt>b") == "a<\\/ScRiPt>b"
    assert inline_script('x="</p>"') == 'x="</p>"'  # other end tags are harmless inside a script


def test_dvc_fills_the_template_with_its_plots_and_adds_no_script_from_the_network(tmp_path):
    """DVC's own renderer: its default page loads vega from a CDN (the test can fail); with the
    template the page holds the plot's spec and data, the inlined bundles and no <script src>."""
    from dvc_render.html import render_html
    from dvc_render.vega import VegaRenderer

    points = [{"step": "0", "loss": "3.25", "rev": "workspace", "filename": "c.csv", "field": "loss"},
              {"step": "1", "loss": "2.71828", "rev": "workspace", "filename": "c.csv", "field": "loss"}]
    default = render_html([VegaRenderer(points, "c.csv", x="step", y="loss")], tmp_path / "cdn" / "index.html")
    assert SCRIPT_SRC.search(Path(default).read_text())
    template = build_template(fake_node_modules(tmp_path / "node_modules"), tmp_path / "t" / "offline.html")
    page = render_html([VegaRenderer(points, "c.csv", x="step", y="loss")], tmp_path / "out" / "index.html",
                       html_template=template)
    html = Path(page).read_text()
    assert SCRIPT_SRC.search(html) is None and "cdn." not in html
    assert "FAKE_EMBED" in html and "vegaEmbed('#c_csv', spec)" in html and '"loss": "2.71828"' in html
    assert not any(p in html for p in PLACEHOLDERS)


def test_a_missing_bundle_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    modules = fake_node_modules(tmp_path / "node_modules")
    (modules / "vega-embed" / "build" / "vega-embed.min.js").unlink()
    missing = str(modules / "vega-embed" / "build" / "vega-embed.min.js")
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + ".*make plots.*npm ci --ignore-scripts"):
        build_template(modules, tmp_path / "t.html")
    assert not (tmp_path / "t.html").exists()
    assert main(["--node-modules", str(tmp_path / "absent"), "--out", str(tmp_path / "t.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m esolm.plots_html: error: ")
    assert str(tmp_path / "absent" / "vega" / "build" / "vega.min.js") in err and "make plots" in err


def test_a_bundle_holding_a_dvc_placeholder_is_refused(tmp_path):
    """DVC replaces its placeholders anywhere in the page, inside a script too."""
    modules = fake_node_modules(tmp_path / "node_modules", vega='var s="{scripts}";')
    with pytest.raises(ValueError, match=r"vega\.min\.js contains \{scripts\}"):
        render_template(modules)


def test_the_module_writes_the_template_and_prints_its_path(tmp_path, capsys):
    modules = fake_node_modules(tmp_path / "node_modules")
    out = tmp_path / "deep" / "plots.html"
    assert main(["--node-modules", str(modules), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text() == render_template(modules)
    assert [p.name for p in out.parent.iterdir()] == ["plots.html"]  # no temporary file left


def test_the_lock_pins_every_package_by_hash_and_names_no_registry():
    lock = json.loads((WEB / "package-lock.json").read_text())
    pins = json.loads((WEB / "package.json").read_text())["dependencies"]
    assert set(pins) == {package for package, _ in BUNDLES}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in pins.values()), "exact versions"
    packages = {k: v for k, v in lock["packages"].items() if k}
    for name, version in pins.items():
        assert packages[f"node_modules/{name}"]["version"] == version
    assert all(v["integrity"].startswith("sha512-") for v in packages.values())
    text = (WEB / "package-lock.json").read_text()
    assert '"resolved"' not in text and "registry" not in text
    assert "omit-lockfile-registry-resolved=true" in (WEB / ".npmrc").read_text()


@pytest.mark.slow
@pytest.mark.network
def test_the_pinned_bundles_make_a_page_whose_plot_draws_without_a_network(tmp_path):
    """``npm ci`` of web/ into a copy (the lock unchanged), the template from the real bundles,
    ``dvc plots show`` of a one-plot repository through it, and the page's own scripts (as the
    HTML parser splits them) run in node: they define vegaEmbed and draw the plot's line."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("needs node and npm")
    web = tmp_path / "web"
    web.mkdir()
    for name in ("package.json", "package-lock.json", ".npmrc"):
        shutil.copy(WEB / name, web / name)
    subprocess.run(["npm", "ci", "--ignore-scripts", "--omit=optional", "--no-audit", "--no-fund"],
                   cwd=web, check=True, capture_output=True, timeout=600)
    assert (web / "package-lock.json").read_bytes() == (WEB / "package-lock.json").read_bytes()
    pins = json.loads((WEB / "package.json").read_text())["dependencies"]
    template = build_template(web / "node_modules", tmp_path / "plots-offline.html")
    html = template.read_text()
    assert SCRIPT_SRC.search(html) is None and "{scripts}" not in html and "{plot_divs}" in html
    # the names the page calls: vega's View and parse, vega-lite's compile, the global vegaEmbed
    assert all(name in html for name in (".View=", ".parse=function", ".compile=function", ").vegaEmbed="))
    assert f'.version="{pins["vega"]}"' in html and f'var n="{pins["vega-lite"]}"' in html
    assert all(f"<!-- {p} {pins[p]} (" in html for p in pins)

    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
    (repo / "curve.csv").write_text("step,loss\n0,6.25\n10,4.5\n20,3.14159\n")
    (repo / "dvc.yaml").write_text("plots:\n  - curve.csv:\n      x: step\n      y: loss\n")
    subprocess.run([dvc, "plots", "show", "--html-template", str(template), "-o", "out"],
                   cwd=repo, check=True, capture_output=True, timeout=300)
    page = (repo / "out" / "index.html").read_text()
    assert SCRIPT_SRC.search(page) is None and "cdn." not in page
    assert '"loss": "3.14159"' in page and "vegaEmbed('#curve_csv', spec)" in page

    scripts = Scripts(page).scripts
    assert len(scripts) == 4  # the three bundles and the plot's
    files = []
    for i, (_, text) in enumerate(scripts[:3]):
        files.append(tmp_path / f"bundle{i}.js")
        files[-1].write_text(text)
    spec = re.search(r"var spec = (\{.*\});\s*vegaEmbed", scripts[3][1], re.DOTALL).group(1)
    (tmp_path / "spec.json").write_text(spec)
    (tmp_path / "draw.js").write_text(DRAW_JS)
    run = subprocess.run(["node", str(tmp_path / "draw.js"), *map(str, files), str(tmp_path / "spec.json")],
                         check=True, capture_output=True, text=True, timeout=120)
    drawn = json.loads(run.stdout)
    assert (drawn["embed"], drawn["embedVersion"]) == ("function", pins["vega-embed"])
    assert (drawn["vega"], drawn["vegaLite"]) == (pins["vega"], pins["vega-lite"])
    line = re.search(r'<g class="mark-line role-mark[^>]*>(.*?)</g>', drawn["svg"], re.DOTALL)
    assert line and re.search(r'd="M[-\d.]+,[-\d.]+L', line.group(1)), "a drawn line"
    assert "loss: 3.14159" in drawn["svg"]


# a browser-like global without a DOM, where the bundles' UMD wrappers define vega, vegaLite and
# vegaEmbed; the spec compiled by vega-lite and drawn to SVG by vega (renderer "none": no canvas)
DRAW_JS = """
const vm = require("vm"), fs = require("fs");
const args = process.argv.slice(2), specFile = args.pop();
const ctx = {};
for (const k of ["console", "setTimeout", "clearTimeout", "setInterval", "clearInterval", "queueMicrotask",
                 "structuredClone", "TextEncoder", "TextDecoder", "URL", "performance"]) ctx[k] = globalThis[k];
vm.createContext(ctx);
for (const f of args) vm.runInContext(fs.readFileSync(f, "utf8"), ctx, {filename: f});
const spec = JSON.parse(fs.readFileSync(specFile, "utf8"));
const view = new ctx.vega.View(ctx.vega.parse(ctx.vegaLite.compile(spec).spec), {renderer: "none"});
view.toSVG().then(svg => console.log(JSON.stringify({embed: typeof ctx.vegaEmbed,
  embedVersion: ctx.vegaEmbed.version, vega: ctx.vega.version, vegaLite: ctx.vegaLite.version, svg})));
"""
