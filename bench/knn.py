"""k-NN speed: selfsup_eval's chunked top-k vs scikit-learn brute force, same predictions.

60k × 512 train features in 10 clusters, 10k queries, k=20, T=0.07 (DINO's weighted vote).

    python bench/knn.py [--train 60000 --queries 10000 --dim 512]
"""

import argparse
import platform
import time

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

from selfsup_eval.knn import knn_classify


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=60000)
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=20)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, args.dim, generator=g)
    ytr = torch.randint(0, 10, (args.train,), generator=g)
    yq = torch.randint(0, 10, (args.queries,), generator=g)
    xtr = centres[ytr] + 2.0 * torch.randn(args.train, args.dim, generator=g)
    xq = centres[yq] + 2.0 * torch.randn(args.queries, args.dim, generator=g)

    t = time.perf_counter()
    ours = knn_classify(xtr, ytr, xq, ks=(args.k,), temperature=0.07)[args.k][:, 0].numpy()
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    sk = KNeighborsClassifier(n_neighbors=args.k, algorithm="brute", metric="cosine",
                              weights=lambda d: np.exp((1 - d) / 0.07))
    sk.fit(xtr.numpy(), ytr.numpy())
    theirs = sk.predict(xq.numpy())
    t_sk = time.perf_counter() - t

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"train {args.train} x {args.dim}, queries {args.queries}, k={args.k}")
    print(f"selfsup_eval knn : {t_ours:7.2f} s   top-1 {np.mean(ours == yq.numpy()):.4f}")
    print(f"scikit-learn     : {t_sk:7.2f} s   top-1 {np.mean(theirs == yq.numpy()):.4f}")
    print(f"identical predictions: {np.mean(ours == theirs):.4%}")
    print(f"speed-up: {t_sk / t_ours:.1f}x")


if __name__ == "__main__":
    main()
