#!/usr/bin/env bash
# The docs site's screenshots (docs/assets/site_*.png): the built site's home page and configuration
# reference, in headless Chromium (Debian: apt-get install chromium), served over HTTP as a reader sees it.
#   bash docs/site_screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
site="$(mktemp -d)"
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/python -m http.server "$port" --bind 127.0.0.1 --directory "$site" > /dev/null 2>&1 &
server=$!
for _ in $(seq 50); do
    curl -sf "http://127.0.0.1:$port/" > /dev/null && break
    sleep 0.2
done
shot() {  # shot PAGE OUT
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1000 \
        --virtual-time-budget=3000 --screenshot="$2" "http://127.0.0.1:$port/$1" > /dev/null 2>&1
    echo "wrote $2"
}
shot "" docs/assets/site_home.png
shot "reference/configuration/" docs/assets/site_configuration.png
