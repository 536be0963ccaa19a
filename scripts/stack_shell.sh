#!/usr/bin/env bash
# make's SHELL: every recipe runs with a 32 MB stack, which Holoscan (imported by monai with the
# Deploy SDK installed) asks for.
ulimit -s 32768 2>/dev/null || ulimit -s unlimited 2>/dev/null || true
exec /bin/bash "$@"
