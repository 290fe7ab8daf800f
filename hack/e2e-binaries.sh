#!/usr/bin/env bash
# Build (or reuse from cache) the binaries the meshguard e2e and node suites need:
#   kube-apiserver, kube-controller-manager, kubectl, etcd, helm (the e2e control plane)
#   kubelet, kube-scheduler, kube-proxy, pause (the real node)
#   coredns (the node's cluster DNS; cached on its own and linked into the bin directory)
#
# The e2e suite talks to a real API server, so it needs real control-plane
# binaries. They are built from source with `go build`, fetching sources only
# through the Go module proxy (no release tarballs), at the versions pinned in
# hack/versions.env. Results are cached per version set under
#   $HOME/.cache/meshguard-e2e/<KUBERNETES_VERSION>-etcd<ETCD_VERSION>-helm<HELM_VERSION>/bin
# (override the root with MESHGUARD_E2E_CACHE). When the cache is complete the
# script returns immediately.
#
# With --cached it never builds: it prints the bin directory when the cache is complete and exits 1 otherwise
# (the test suite uses this to skip, with the reason, what it cannot run).
#
# Output: progress goes to stderr; the LAST line of stdout is the absolute path
# of the bin directory, e.g.
#   BIN=$(hack/e2e-binaries.sh | tail -n1)
#
# Requirements: bash, coreutils, a Go toolchain on PATH (or GO=/path/to/go), a C
# compiler with a static libc (for pause), access to the Go module proxy. A cold build takes roughly 15-25 minutes on
# 2 cores (kube-apiserver dominates); warm Go build caches make rebuilds fast.
set -euo pipefail

log() { printf '[e2e-binaries] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$HACK_DIR/versions.env"
: "${KUBERNETES_VERSION:?KUBERNETES_VERSION not set in hack/versions.env}"
: "${ETCD_VERSION:?ETCD_VERSION not set in hack/versions.env}"
: "${HELM_VERSION:?HELM_VERSION not set in hack/versions.env}"

BINARIES=(kube-apiserver kube-controller-manager kubectl etcd helm kubelet kube-scheduler kube-proxy pause)
CACHE_ROOT=${MESHGUARD_E2E_CACHE:-$HOME/.cache/meshguard-e2e}
CACHE_KEY="${KUBERNETES_VERSION}-etcd${ETCD_VERSION}-helm${HELM_VERSION}"
DEST_DIR="$CACHE_ROOT/$CACHE_KEY"
BIN_DIR="$DEST_DIR/bin"

cache_complete() {
  local b
  [[ -f "$DEST_DIR/.complete" ]] || return 1
  for b in "${BINARIES[@]}"; do
    [[ -x "$BIN_DIR/$b" ]] || return 1
  done
}

# --cached: only say where complete binaries are (exit 1 when they are not built yet); never build.
if [[ "${1:-}" == "--cached" ]]; then
  cache_complete || { log "not built yet: run hack/e2e-binaries.sh (or bash .ci/run)"; exit 1; }
  echo "$BIN_DIR"
  exit 0
fi

# CoreDNS: its own cache entry, linked into BIN_DIR once that exists (go install builds its main package).
COREDNS_DIR="$CACHE_ROOT/coredns-${COREDNS_VERSION:?COREDNS_VERSION not set in hack/versions.env}"
ensure_coredns() {
  if [[ ! -x "$COREDNS_DIR/coredns" ]]; then
    local start=$SECONDS tmp
    log "coredns $COREDNS_VERSION"
    tmp=$(mktemp -d "$CACHE_ROOT/.coredns.XXXXXX")
    GOBIN="$tmp" CGO_ENABLED=0 GOWORK=off GOFLAGS=-trimpath "${GO:-go}" install -ldflags "-s -w" \
      "github.com/coredns/coredns@$COREDNS_VERSION" >&2
    "$tmp/coredns" -version >&2
    rm -rf "$COREDNS_DIR" && mv "$tmp" "$COREDNS_DIR"
    log "coredns done in $((SECONDS - start))s"
  fi
  ln -sfn "$COREDNS_DIR/coredns" "$BIN_DIR/coredns"
}

# Fast path: nothing to do.
if cache_complete; then
  log "using cached binaries ($CACHE_KEY)"
  ensure_coredns
  echo "$BIN_DIR"
  exit 0
fi

# ---------------------------------------------------------------------------
# Slow path: build everything into a temp dir, then rename into place.
# ---------------------------------------------------------------------------
GO=${GO:-go}
command -v "$GO" >/dev/null 2>&1 ||
  die "'$GO' not found: install Go (>= the go directive of k8s.io/kubernetes@$KUBERNETES_VERSION) and put it on PATH, or set GO=/path/to/go"

mkdir -p "$CACHE_ROOT"

# Serialize concurrent runs (e.g. parallel test workers) on the same cache.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE_ROOT/.lock"
  log "waiting for cache lock..."
  flock 9
  if cache_complete; then
    log "binaries were built by a concurrent run ($CACHE_KEY)"
    echo "$BIN_DIR"
    exit 0
  fi
  # We hold the lock, so any leftover build dir is from an interrupted run.
  rm -rf "$CACHE_ROOT"/.build.*
fi

# Same filesystem as DEST_DIR so the final `mv` is an atomic rename.
WORK=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
OUT="$WORK/out"
mkdir -p "$OUT/bin"

# Module mode, sources from the module proxy, default GOPATH/GOCACHE so that
# repeated builds reuse the module and build caches.
export GO111MODULE=on GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
unset GOOS GOARCH

log "go: $("$GO" version)"
log "building into $WORK (cache key $CACHE_KEY)"

# Print the path of the downloaded go.mod of module@version.
gomod_path() {
  "$GO" mod download -json "$1" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p'
}

# go_get ARGS...: `go get` with the per-module "go: added ..." chatter dropped.
go_get() {
  "$GO" get "$@" 2>&1 | sed -e '/^go: \(added\|upgraded\|downgraded\) /d' >&2
}

# new_wrapper DIR NAME: create an empty throwaway module to build from.
new_wrapper() {
  mkdir -p "$1"
  (cd "$1" && "$GO" mod init "$2" >&2)
}

# --- Kubernetes: kube-apiserver, kube-controller-manager, kubectl ----------
build_kubernetes() {
  local start=$SECONDS kv=${KUBERNETES_VERSION#v} dir="$WORK/kubernetes"
  local major=${kv%%.*} rest=${kv#*.}
  local minor=${rest%%.*}
  local staging_version="v0.${rest}" # v1.37.2 -> v0.37.2
  log "kubernetes $KUBERNETES_VERSION (staging modules at $staging_version)"

  local gomod
  gomod=$(gomod_path "k8s.io/kubernetes@$KUBERNETES_VERSION")
  [[ -n "$gomod" && -f "$gomod" ]] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION"

  # k8s.io/kubernetes replaces its staging modules with ./staging/src/...;
  # replace directives of dependencies are ignored, so re-pin them here.
  local staging
  staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod")
  [[ -n "$staging" ]] || die "no staging replace directives found in $gomod"

  new_wrapper "$dir" meshguard.invalid/e2e-kubernetes
  local args=(-require="k8s.io/kubernetes@$KUBERNETES_VERSION") m
  for m in $staging; do
    args+=(-replace="$m=$m@$staging_version")
  done
  (cd "$dir" && "$GO" mod edit "${args[@]}")
  log "pinned $(wc -w <<<"$staging") staging modules"

  local pkgs=(k8s.io/kubernetes/cmd/kube-apiserver
              k8s.io/kubernetes/cmd/kube-controller-manager
              k8s.io/kubernetes/cmd/kubectl
              k8s.io/kubernetes/cmd/kubelet
              k8s.io/kubernetes/cmd/kube-scheduler
              k8s.io/kubernetes/cmd/kube-proxy)
  (cd "$dir" && go_get "${pkgs[@]/%/@$KUBERNETES_VERSION}")

  local ldflags="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  log "go build ${pkgs[*]} (slow: kube-apiserver takes 10-20 min on 2 cores)"
  (cd "$dir" && "$GO" build -trimpath -ldflags "$ldflags" -o "$OUT/bin/" "${pkgs[@]}" >&2)
  # The sandbox ("pause") container's program, from the same module: a static C binary, so the node needs no registry.
  local src
  src=$(cd "$dir" && "$GO" list -m -f '{{.Dir}}' k8s.io/kubernetes)
  ${CC:-cc} -Os -static -o "$OUT/bin/pause" "$src/build/pause/linux/pause.c" >&2
  log "kubernetes done in $((SECONDS - start))s"
}

# --- etcd -------------------------------------------------------------------
build_etcd() {
  local start=$SECONDS dir="$WORK/etcd"
  log "etcd $ETCD_VERSION"
  new_wrapper "$dir" meshguard.invalid/e2e-etcd
  # The server module's go.mod replaces its sibling modules (api, client, pkg)
  # with ../ paths; it also requires them at the same version, which is what
  # we pin explicitly here.
  local args=() m
  for m in server/v3 api/v3 client/pkg/v3 client/v3 pkg/v3; do
    args+=("go.etcd.io/etcd/$m@$ETCD_VERSION")
  done
  (cd "$dir" && go_get "${args[@]}")
  # The etcd server's main package is the module root.
  (cd "$dir" && "$GO" build -trimpath -ldflags "-s -w" -o "$OUT/bin/etcd" go.etcd.io/etcd/server/v3 >&2)
  log "etcd done in $((SECONDS - start))s"
}

# --- helm -------------------------------------------------------------------
build_helm() {
  local start=$SECONDS dir="$WORK/helm"
  local module="helm.sh/helm/${HELM_VERSION%%.*}" # v4.3.1 -> helm.sh/helm/v4
  log "helm $HELM_VERSION ($module)"
  new_wrapper "$dir" meshguard.invalid/e2e-helm
  (cd "$dir" && go_get "$module/cmd/helm@$HELM_VERSION")
  local ldflags="-s -w -X $module/internal/version.version=$HELM_VERSION -X $module/internal/version.gitTreeState=clean"
  (cd "$dir" && "$GO" build -trimpath -ldflags "$ldflags" -o "$OUT/bin/helm" "$module/cmd/helm" >&2)
  log "helm done in $((SECONDS - start))s"
}

TOTAL_START=$SECONDS
# Cheapest first, so a broken pin fails fast.
build_etcd
build_helm
build_kubernetes

log "smoke-testing the new binaries"
"$OUT/bin/kube-apiserver" --version >&2
"$OUT/bin/kube-controller-manager" --version >&2
"$OUT/bin/kubectl" version --client >&2
"$OUT/bin/etcd" --version >&2
"$OUT/bin/helm" version >&2
"$OUT/bin/kubelet" --version >&2
"$OUT/bin/kube-scheduler" --version >&2
"$OUT/bin/kube-proxy" --version >&2

{
  echo "KUBERNETES_VERSION=$KUBERNETES_VERSION"
  echo "ETCD_VERSION=$ETCD_VERSION"
  echo "HELM_VERSION=$HELM_VERSION"
  echo "GO_VERSION=$("$GO" env GOVERSION)"
} >"$OUT/.complete"

# Swap into place: move any stale/partial entry aside first (it is deleted
# with $WORK), then rename the finished tree in one step.
if [[ -e "$DEST_DIR" ]]; then
  mv "$DEST_DIR" "$WORK/stale"
fi
mv "$OUT" "$DEST_DIR"
log "all binaries built in $((SECONDS - TOTAL_START))s"
ensure_coredns

echo "$BIN_DIR"
