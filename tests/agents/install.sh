#!/usr/bin/env bash
# Install the real agents the agent tests run, at pinned versions, outside the repo.
# One npm prefix per agent@version so several releases sit side by side.
# Usage: tests/agents/install.sh [DIR]   (default $LLMSPY_AGENTS_DIR or /var/cache/llmspyd-test/agents)
# Prints nothing but npm's own output; idempotent (a prefix whose binary exists is skipped).
set -euo pipefail

DIR="${1:-${LLMSPY_AGENTS_DIR:-/var/cache/llmspyd-test/agents}}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$DIR"

# name@version  ->  prefix "$DIR/<name with / replaced>-<version>"
while read -r spec; do
	[[ -z "$spec" || "$spec" == \#* ]] && continue
	name="${spec%@*}"
	version="${spec##*@}"
	prefix="$DIR/$(echo "${name#@}" | tr '/' '-')-$version"
	if [[ -e "$prefix/.installed" ]]; then
		continue
	fi
	# --foreground-scripts: the packages' postinstall picks the platform binary
	npm install --prefix "$prefix" --no-audit --no-fund --foreground-scripts "$spec"
	touch "$prefix/.installed"
done < "$HERE/versions.txt"
