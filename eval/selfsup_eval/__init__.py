"""selfsup_eval: k-NN and linear probes on exported selfsup backbones."""
