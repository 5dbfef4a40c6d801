#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and etcd once into a cache outside the repo,
# keyed by the versions pinned in go.mod, and prints the bin directory. Later runs reuse it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

k8s_version=$(awk '$1=="k8s.io/kubernetes"{print $2; exit}' go.mod)
etcd_version=$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2; exit}' go.mod)
cache_root=${PBX_OPERATOR_CACHE:-$HOME/.cache/pbx-operator}
bin_dir="$cache_root/controlplane/$k8s_version-etcd$etcd_version/bin"

if [ -x "$bin_dir/kube-apiserver" ] && [ -x "$bin_dir/kube-controller-manager" ] && [ -x "$bin_dir/etcd" ]; then
  echo "$bin_dir"
  exit 0
fi

mkdir -p "$bin_dir"
minor=${k8s_version#v1.}; minor=${minor%%.*}
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version"
start=$(date +%s)
export CGO_ENABLED=0
# Build one at a time: two cores, and each link uses several GiB.
for cmd in k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager; do
  echo "building $cmd $k8s_version" >&2
  go build -trimpath -ldflags "$ldflags" -o "$bin_dir.tmp-$(basename "$cmd")" "$cmd"
done
echo "building etcd $etcd_version" >&2
go build -trimpath -ldflags "-s -w" -o "$bin_dir.tmp-etcd" go.etcd.io/etcd/server/v3
for b in kube-apiserver kube-controller-manager etcd; do mv "$bin_dir.tmp-$b" "$bin_dir/$b"; done
echo "control plane built in $(( $(date +%s) - start ))s" >&2
echo "$bin_dir"
