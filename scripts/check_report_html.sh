#!/usr/bin/env bash
# Render a raycyto report.html in headless Chromium, take a screenshot, and verify that
# every <img> on the page loaded (complete with a natural width > 0).
#
# Usage: scripts/check_report_html.sh REPORT_DIR/report.html [SCREENSHOT.png]
# Example: scripts/check_report_html.sh runs/karyo/report/report.html /tmp/report.png
# Needs Debian's chromium (apt-get install -y chromium); a check tool, not a CI dependency.
set -euo pipefail
html="$(realpath "${1:?usage: $0 REPORT.html [SCREENSHOT.png]}")"
shot="${2:-/tmp/report.png}"
browser="$(command -v chromium || command -v chromium-browser || true)"
[[ -n "$browser" ]] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 3; }
dir="$(dirname "$html")"
profile="$(mktemp -d)"
# A copy beside the original (so relative <img src> resolve) with a tiny load-time check.
probe="$(mktemp -p "$dir" .check_XXXXXX.html)"
trap 'rm -rf "$profile" "$probe"' EXIT
sed 's#</body>#<script>addEventListener("load",()=>{const i=[...document.images];const b=i.filter(x=>!(x.complete\&\&x.naturalWidth>0)).map(x=>x.getAttribute("src"));const p=document.createElement("pre");p.textContent="IMGCHECK total="+i.length+" broken="+b.length+" "+b.join(",");document.body.appendChild(p);});</script></body>#' \
  "$html" > "$probe"
flags=(--headless --no-sandbox --disable-gpu --disable-background-networking
       --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile")
dom="$("$browser" "${flags[@]}" --virtual-time-budget=10000 --dump-dom "file://$probe" 2>/dev/null)"
"$browser" "${flags[@]}" --screenshot="$shot" --window-size=1400,4000 "file://$html" >/dev/null 2>&1
line="$(grep -o 'IMGCHECK total=[0-9]* broken=[0-9]*[^<]*' <<<"$dom" || true)"
expected="$(grep -o '<img ' "$html" | wc -l)"
echo "${line:-IMGCHECK missing: the page did not finish loading}; <img> in file: $expected; screenshot: $shot"
[[ "$line" =~ total=([0-9]+)\ broken=0 ]] && (( BASH_REMATCH[1] == expected && expected > 0 ))
