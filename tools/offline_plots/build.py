"""Builds page.html, the template `dvc plots show` / `dvc plots diff` fill (`plots.html_template` in .dvc/config), with
vega, vega-lite and vega-embed inlined, so the page draws its charts with no network. DVC's own page loads them
from a CDN and is blank offline.

    python tools/offline_plots/build.py     # downloads the pinned packages from the npm registry and checks them

The packages are pinned with the registry's sha512 integrity; their BSD-3-Clause licenses go next to the page and
into it. The versions are the newest of the majors DVC's page loads (vega 5, vega-lite 5, vega-embed 6), whose
specs DVC's templates are written for (vega-lite v5 schema).
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGISTRY = "https://registry.npmjs.org"
PACKAGES = {  # name: (version, sha512 integrity from the registry, script inside the tarball)
    "vega": (
        "5.33.1",
        "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
        "package/build/vega.min.js",
    ),
    "vega-lite": (
        "5.23.0",
        "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
        "package/build/vega-lite.min.js",
    ),
    "vega-embed": (
        "6.29.0",
        "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
        "package/build/vega-embed.min.js",
    ),
}
# vega's tarball has no LICENSE file (its package.json says BSD-3-Clause); vega-lite's text is the same license of
# the same lab, so it stands for both.
LICENSE_OF = {"vega": "vega-lite", "vega-lite": "vega-lite", "vega-embed": "vega-embed"}

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Offline page for `dvc plots show` (tools/offline_plots/build.py): {versions}, inlined. -->
{scripts}
    <script>
        // DVC's page calls vegaEmbed(el, spec) per chart: draw as SVG (crisp at any zoom, charts readable in the DOM)
        const canvasEmbed = vegaEmbed;
        vegaEmbed = (el, spec, options) => canvasEmbed(el, spec, Object.assign({{renderer: "svg"}}, options));
    </script>
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str, integrity: str) -> tarfile.TarFile:
    url = f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != integrity:
        raise SystemExit(f"{url}: integrity {digest} is not the pinned {integrity}")
    return tarfile.open(fileobj=io.BytesIO(data))


def main() -> None:
    codes, licenses = {}, {}
    for name, (version, integrity, member) in PACKAGES.items():
        with fetch(name, version, integrity) as tar:
            codes[name] = tar.extractfile(member).read().decode("utf-8")
            if LICENSE_OF[name] == name:
                licenses[name] = tar.extractfile("package/LICENSE").read().decode("utf-8")
        if "</script" in codes[name] or "{plot_divs}" in codes[name]:  # would end the script early / be filled
            raise SystemExit(f"{name}: cannot be inlined as is")
    scripts = []
    for name, (version, _, _) in PACKAGES.items():
        licence = licenses[LICENSE_OF[name]].strip().replace("*/", "* /")
        scripts.append(f"    <script>/*! {name}@{version}, BSD-3-Clause:\n{licence}\n*/\n{codes[name]}\n    </script>")
    for name, text in licenses.items():
        (HERE / f"LICENSE-{name}.txt").write_text(text, encoding="utf-8")
    versions = ", ".join(f"{name}@{version}" for name, (version, _, _) in PACKAGES.items())
    page = PAGE.format(versions=versions, scripts="\n".join(scripts))
    (HERE / "page.html").write_text(page, encoding="utf-8")
    print(f"wrote {HERE / 'page.html'} ({len(page) // 1024} KiB: {versions})")


if __name__ == "__main__":
    main()
