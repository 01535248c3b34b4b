"""Kubernetes (KubeRay) manifests kept in step with the Serve configs.

``kubernetes/rayservice.yaml`` carries ``serve_configs/gpu_cluster.yaml`` verbatim as its
``serveConfigV2`` block, so the cluster YAML stays the one place the app is configured::

    python -m raycyto.serve.kube kubernetes/rayservice.yaml serve_configs/gpu_cluster.yaml
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

KEY = "serveConfigV2"


def _block(manifest: str) -> tuple[int, int, str]:
    """(start, end, indent) of the text of the ``serveConfigV2: |`` block scalar."""
    m = re.search(rf"^(?P<ind> *){KEY}: \|\n", manifest, flags=re.M)
    if m is None:
        raise ValueError(f"no '{KEY}: |' block in the manifest")
    indent = m.group("ind") + "  "
    end = m.end()
    for line in manifest[m.end():].splitlines(keepends=True):
        if line.strip() and not line.startswith(indent):
            break
        end += len(line)
    return m.end(), end, indent


def embedded_serve_config(manifest: str) -> str:
    """The Serve config text held in the manifest's ``serveConfigV2`` block."""
    start, end, indent = _block(manifest)
    lines = manifest[start:end].splitlines(keepends=True)
    return "".join(line[len(indent):] if line.strip() else "\n" for line in lines).rstrip("\n") + "\n"


def embed_serve_config(manifest: str, serve_config: str) -> str:
    """The manifest with its ``serveConfigV2`` block replaced by ``serve_config`` (verbatim)."""
    start, end, indent = _block(manifest)
    body = "".join(f"{indent}{line}" if line.strip() else "\n"
                   for line in serve_config.rstrip("\n").splitlines(keepends=True))
    return manifest[:start] + body.rstrip("\n") + "\n" + manifest[end:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite MANIFEST's serveConfigV2 from SERVE_YAML; prints whether anything changed."""
    manifest, serve_yaml = (Path(p) for p in (argv or sys.argv[1:]))
    old = manifest.read_text()
    new = embed_serve_config(old, serve_yaml.read_text())
    if new != old:
        manifest.write_text(new)
    print(f"{manifest}: {'updated' if new != old else 'up to date'} from {serve_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
