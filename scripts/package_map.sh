#!/usr/bin/env bash
# Package deploy_app as a MONAI Application Package (MAP) with holoscan-cli 4.2.0's `monai-deploy package`.
#
#   scripts/package_map.sh [--tag NAME[:VERSION]] [--models DIR] [--source MANIFEST] [--output DIR]
#                          [--platform PLATFORM] [--uid N] [--gid N] [--tarball]
#
# Defaults: tag calcimap:<application.version in app.yaml>, models models/, the packager's own (online) manifest,
# output output/map, platform x86_64, container user 1000:1000. Offline, pass --source with a local copy of the
# holoscan-cli 4.2.0 manifest (here ../shared/data/holoscan/artifacts-4.2.0.json). See docs/map.md.
#
# Why this is more than one `monai-deploy package` line:
# - `--add DIR` copies the *contents* of DIR into /opt/holoscan/lib and puts every folder below it on PYTHONPATH.
#   `--add bundles` would give /opt/holoscan/lib/s2cac_coronary_calcium, which the app cannot import as
#   `bundles.s2cac_coronary_calcium...`. So we stage <output>/add/ as a copy of the repository-root layout the app
#   resolves from its own location (deploy_app/.. holds bundles/ and configs/): add/bundles (code, configs,
#   licences; no weights or training runs), add/configs (series-selection and quality rules) and add/deploy_app.
#   In the image that is /opt/holoscan/lib/{bundles,configs,deploy_app}, importable through /opt/holoscan/lib on
#   PYTHONPATH. deploy_app goes there because the packager copies the app folder to /opt/holoscan/app, where the
#   name `deploy_app` and the repository root beside it are lost; the app must import the package from there.
# - The packager renders app.json, pkg.json and the Dockerfile into a temporary folder that it deletes when the
#   Docker build fails (or succeeds). We run the same packager entry point as the `monai-deploy` command with that
#   folder kept as <output>/build, so the rendered files can be read (and tested) on machines without Docker.
#
# Exit codes: 0 image built; 2 usage; 3 app folder; 4 models; 5 app.yaml; 6 manifest source; 7 packager failed;
# 8 Docker (with buildx) unavailable after rendering; 9 the Docker build failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
MONAI_DEPLOY="$ROOT/.venv/bin/monai-deploy"
APP_DIR="$ROOT/deploy_app"
CONFIG="$ROOT/app.yaml"
BUNDLES_DIR="$ROOT/bundles"
SETTINGS_DIR="$ROOT/configs"
# The models the app loads, each exported by `make models` as <name>/model.ts (the app checks their sha256).
MODEL_NAMES=(s2cac_coronary s2cac_ica dst_landmarks)

die() { # die CODE MESSAGE...: one line on stderr (the words joined by spaces), distinct exit status
    local code="$1"
    shift
    echo "package_map: error: $*" >&2
    exit "$code"
}

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

tag="" models="$ROOT/models" source="" output="$ROOT/output/map" platform="x86_64" uid=1000 gid=1000 tarball=0
while (($#)); do
    case "$1" in
        --tag | --models | --source | --output | --platform | --uid | --gid)
            (($# >= 2)) || die 2 "$1 needs a value"
            case "$1" in
                --tag) tag="$2" ;;
                --models) models="$2" ;;
                --source) source="$2" ;;
                --output) output="$2" ;;
                --platform) platform="$2" ;;
                --uid) uid="$2" ;;
                --gid) gid="$2" ;;
            esac
            shift 2
            ;;
        --tarball) tarball=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        *) die 2 "unknown argument '$1' (see --help)" ;;
    esac
done

# --- inputs, checked before anything is written --------------------------------------------------------------
[[ "$uid" =~ ^[0-9]+$ && "$gid" =~ ^[0-9]+$ ]] || die 2 "--uid and --gid take numeric ids"
[[ -x "$PY" && -x "$MONAI_DEPLOY" ]] || die 2 "$ROOT/.venv with holoscan-cli 4.2.0 is missing: run 'make setup'"
[[ -d "$APP_DIR" ]] || die 3 "app folder $APP_DIR not found"
[[ -f "$APP_DIR/__main__.py" ]] ||
    die 3 "$APP_DIR/__main__.py not found: the MAP starts the app as 'python3 <app folder>'"
[[ -f "$APP_DIR/requirements.txt" ]] ||
    die 3 "$APP_DIR/requirements.txt not found: the image installs the app's packages from it"
[[ -d "$BUNDLES_DIR" ]] || die 3 "bundle folder $BUNDLES_DIR not found: the app imports the bundles' code"
[[ -d "$SETTINGS_DIR" ]] ||
    die 3 "settings folder $SETTINGS_DIR not found: the app reads its series and quality rules there"

[[ -d "$models" ]] || die 4 "models folder $models not found (make models exports them)"
shopt -s nullglob  # an empty models folder falls through to the per-model check
for entry in "$models"/*; do
    # A file at the top makes the packager take the whole folder as one model named after the folder.
    [[ -d "$entry" ]] ||
        die 4 "models folder $models must hold only one folder per model, found file $(basename "$entry")"
done
for name in "${MODEL_NAMES[@]}"; do
    [[ -f "$models/$name/model.ts" ]] || die 4 "model $models/$name/model.ts not found (make models exports it)"
done
models="$(cd "$models" && pwd)"

[[ -f "$CONFIG" ]] || die 5 "$CONFIG not found"
version="$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["application"]["version"])' "$CONFIG" \
    2>/dev/null)" || die 5 "$CONFIG has no application.version"
tag="${tag:-calcimap:$version}"

if [[ -n "$source" && "$source" != https://* ]]; then
    [[ -f "$source" ]] ||
        die 6 "manifest source $source not found (a local copy of holoscan-cli 4.2.0's artifacts.json)"
    source="$(cd "$(dirname "$source")" && pwd)/$(basename "$source")"
fi

# --- what the Docker build will need; checked now, reported after rendering ---------------------------------
docker_problem=""
if ! command -v docker >/dev/null 2>&1; then
    docker_problem="no docker command on PATH"
elif ! timeout 30 docker info >/dev/null 2>&1; then
    docker_problem="the Docker daemon is not reachable"
elif ! docker buildx version >/dev/null 2>&1; then
    docker_problem="docker has no buildx plugin"
fi

# --- staging: only folders this script creates are replaced ---------------------------------------------------
mkdir -p "$output"
output="$(cd "$output" && pwd)"
build="$output/build" add="$output/add" log="$output/package.log"
rm -rf "$build" "$add"
mkdir -p "$add/bundles"
cp "$BUNDLES_DIR/__init__.py" "$add/bundles/"
for bundle in "$BUNDLES_DIR"/*/; do
    name="$(basename "$bundle")"
    mkdir "$add/bundles/$name"
    # Code, configs and licence only: the app takes its weights from the models folder, never from a bundle.
    for part in __init__.py LICENSE configs scripts docs; do
        if [[ -e "$bundle/$part" ]]; then cp -R "$bundle/$part" "$add/bundles/$name/"; fi
    done
done
cp -R "$APP_DIR" "$add/deploy_app"
cp -R "$SETTINGS_DIR" "$add/configs"
find "$add" -name __pycache__ -type d -prune -exec rm -rf {} +

args=(package "$APP_DIR" -c "$CONFIG" -t "$tag" --platform "$platform" -m "$models" --add "$add")
args+=(--uid "$uid" --gid "$gid")
if [[ -n "$source" ]]; then args+=(--source "$source"); fi
if ((tarball)); then args+=(--output "$output"); fi

# Holoscan warns below a 32 MB stack (DESIGN.md).
ulimit -s 32768 2>/dev/null || true
# The packager's own entry point, as .venv/bin/monai-deploy runs it (argv[0] names the SDK), with its temporary
# build folder replaced by one that stays.
run_packager() {
    "$PY" - "$build" "$MONAI_DEPLOY" "${args[@]}" <<'EOF'
import sys
import tempfile
import types
from pathlib import Path

import holoscan_cli.packager.packager as packager
from holoscan_cli.__main__ import main

build_dir = Path(sys.argv[1])


class KeptDirectory:
    """Used like tempfile.TemporaryDirectory by the packager, but the folder survives it."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        build_dir.mkdir(parents=True)
        return str(build_dir)

    def __exit__(self, *exc_info):
        return False


packager.tempfile = types.SimpleNamespace(TemporaryDirectory=KeptDirectory, gettempdir=tempfile.gettempdir)
sys.argv = sys.argv[2:]
sys.exit(main())
EOF
}

status=0
if [[ -z "$docker_problem" ]]; then
    run_packager 2>&1 | tee "$log" || status=$?
else
    run_packager >"$log" 2>&1 || status=$?
fi

rendered=1
for file in map/app.json map/pkg.json Dockerfile; do [[ -f "$build/$file" ]] || rendered=0; done
if ((!rendered)); then
    # The packager's first message after its "Error packaging application:" header names the cause.
    reason="$(grep -m1 -A4 'Error packaging application' "$log" | grep -v -e '^\s*$' -e 'Error packaging' |
        head -n1 || true)"
    hint=""
    if [[ -z "$source" ]]; then hint="; offline, pass --source with a local copy of the manifest"; fi
    die 7 "monai-deploy package failed before rendering app.json, pkg.json and the Dockerfile${reason:+: $reason};" \
        "see $log$hint"
fi
if [[ -n "$docker_problem" ]]; then
    die 8 "Docker (with buildx) is needed to build the image ($docker_problem);" \
        "the rendered app.json, pkg.json and Dockerfile are in $build"
fi
((status == 0)) || die 9 "the Docker build failed; see $log (build context: $build)"

image="$(sed -n 's/^ *Docker Tag: *//p' "$log" | tail -n1)"
echo "package_map: built ${image:-$tag} (build context: $build)"
