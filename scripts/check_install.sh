#!/usr/bin/env bash
# Build the wheel and check, as a user on the newest releases would install it, that pip resolves it.
#
#   bash scripts/check_install.sh            (needs the package registry; `make check-install`)
#
# 1. `pip wheel` builds vitreg from this checkout; its only top-level import name must be `vitreg`.
# 2. `pip install --dry-run` resolves the wheel with every extra next to the newest torch the registry offers,
#    ignoring this machine's pip configuration (which may cap torch at the release CI pins).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$PYTHON" -m pip wheel -q --no-deps -w "$out" . >/dev/null
wheel=$(ls "$out"/vitreg-*.whl)
echo "built $(basename "$wheel")"
top=$("$PYTHON" -m zipfile -l "$wheel" | awk 'NR > 1 {split($1, p, "/"); print p[1]}' | sort -u | grep -v '\.dist-info$')
echo "top-level names in the wheel: $top"
[ "$top" = "vitreg" ] || { echo "check-install: the wheel installs more than one top-level name" >&2; exit 1; }

newest=$(PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip index versions torch 2>/dev/null | sed -n 's/^torch (\(.*\))$/\1/p')
echo "newest torch on the registry: $newest"
PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$out/report.json" \
    "${wheel}[all]" "torch==$newest"
"$PYTHON" - "$out/report.json" <<'EOF'
import json, sys
installs = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.load(open(sys.argv[1]))["install"]}
wanted = ("vitreg", "torch", "torchvision", "transformers", "accelerate", "datasets", "huggingface-hub", "timm")
print("resolved: " + ", ".join(f"{name} {installs[name]}" for name in wanted if name in installs))
EOF
echo "check-install: ok"
