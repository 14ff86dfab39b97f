//go:build tools

// Package kube only pins, for `go mod tidy`, the packages that e2e/controlplane.sh builds
// with `go build k8s.io/kubernetes/cmd/...` from this module.
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
)
