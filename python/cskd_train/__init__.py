"""cskd_train: the training application of cskd-kernels (cskd-train, cskd-eval, cskd-demo)."""
