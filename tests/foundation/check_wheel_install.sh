#!/usr/bin/env bash
# The README's Install section, checked as a user without the source tree would do it: build a wheel
# of every distribution (kvbm-core and the four plugins), install them into a NEW virtual
# environment (not editable, nothing from the checkout on sys.path), then run the commands the README
# shows. About 3-4 minutes on two cores (installing torch into the new environment dominates), so it
# is not part of the pytest suite; run it after changing packaging:
#
#   bash tests/foundation/check_wheel_install.sh [WORKDIR]
#
# torch comes from the same pinned CPU build ./dev installs (torch==2.13.0, from pip's configured
# indexes and cache). Exits non-zero at the first step that fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${1:-$(mktemp -d)}"
WHEELS="$WORK/wheels"
VENV="$WORK/venv"
BUILD_PY="${BUILD_PY:-$ROOT/.venv/bin/python}"   # any Python with pip and setuptools>=77
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '\n== %s\n' "$*"; }

step "building wheels into $WHEELS"
rm -rf "$WHEELS" "$VENV"
"$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" \
  "$ROOT" "$ROOT"/plugins/tier_cpu "$ROOT"/plugins/tier_disk "$ROOT"/plugins/tier_gds "$ROOT"/plugins/policy_frequency
ls "$WHEELS"

step "a new virtual environment: $VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0"
# The wheels by path, so that nothing of the same name comes from an index; [all] pulls the plugins.
core=("$WHEELS"/kvbm_core-*.whl)
"$VENV/bin/pip" install -q "${core[0]}[all]" "$WHEELS"/kvbm_tier_*.whl "$WHEELS"/kvbm_policy_*.whl

cd "$WORK"   # not the checkout: only the installed wheels can be imported
step "where kvbm_core comes from"
"$VENV/bin/python" -c 'import kvbm_core, sys; print(kvbm_core.__file__); sys.exit("editable?" if "site-packages" not in kvbm_core.__file__ else 0)'

step "kvbm plugins"
"$VENV/bin/kvbm" plugins | tee "$WORK/plugins.txt"
for dist in kvbm-core kvbm-tier-cpu kvbm-tier-disk kvbm-tier-gds kvbm-policy-frequency; do
  grep -q " $dist " "$WORK/plugins.txt" || { echo "missing $dist"; exit 1; }
done

step "kvbm config show --profile cpu_disk"
"$VENV/bin/kvbm" config show --profile cpu_disk

step "kvbm config path"
"$VENV/bin/kvbm" config path
"$VENV/bin/kvbm" config path --json | "$VENV/bin/python" -c 'import json, sys, os; files = json.load(sys.stdin)["files"]; assert all(os.path.isfile(p) for p in files.values()) and "trtllm/kvbm_llm_api_config.yaml" in files, files'

step "kvbm doctor (host tier, disk tier in a temporary directory, the bundled LLM-API YAML)"
llm_api="$("$VENV/bin/kvbm" config path --json | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["files"]["trtllm/kvbm_llm_api_config.yaml"])')"
set +e
DYN_KVBM_CPU_CACHE_GB=1 DYN_KVBM_DISK_CACHE_GB=1 DYN_KVBM_DISK_CACHE_DIR="$WORK/disk" \
  "$VENV/bin/kvbm" doctor --llm-api-config "$llm_api"
code=$?
set -e
# No GPU and no TensorRT-LLM here: those rows warn; nothing may fail.
[[ $code -eq 0 ]] || { echo "kvbm doctor exited $code"; exit 1; }

step "kvbm-core alone names the distribution a tier needs"
"$VENV/bin/pip" uninstall -q -y kvbm-tier-cpu
set +e
out="$(DYN_KVBM_CPU_CACHE_GB=1 "$VENV/bin/kvbm" config show 2>&1)"
code=$?
set -e
echo "$out"
[[ $code -eq 2 && $out == *"pip install kvbm-tier-cpu"* ]]

step "wheel install checked: $WORK"
