// Command etcd is etcd's own server entry point, built from the published
// go.etcd.io/etcd/server/v3 module so the e2e control plane gets an etcd 3.5 that
// recent kube-apiservers accept (the distribution's etcd is too old).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
