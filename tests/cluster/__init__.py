"""A real single-node cluster (kubelet, containerd, runc, CNI) running the proxy image beside istiod Pods."""
