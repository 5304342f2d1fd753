#!/usr/bin/env bash
# The page's one library, uPlot (charts, ~50 KB, MIT), committed under
# static/vendor/ so that an install needs no build step and no network.
# To update it: bump VERSION, run this, commit the result.
set -euo pipefail
VERSION=1.6.32
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$VERSION" >/dev/null && tar xzf "uplot-$VERSION.tgz")
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" static/vendor/
cp "$tmp/package/LICENSE" static/vendor/uPlot.LICENSE
echo "uPlot $VERSION in static/vendor/"
