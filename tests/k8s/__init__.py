"""A real Kubernetes control plane (etcd + kube-apiserver, built by scripts/install-k8s-peers) for tests."""
