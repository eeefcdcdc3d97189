"""k-NN speed: selfsup_eval's ``knn_classify`` vs scikit-learn brute force, same predictions.

Random-but-clustered features (``--classes`` Gaussian clusters in ``--dim`` dimensions, noise
scaled so that top-1 is well below 100%: a too-easy set would hide disagreements), 60k train x
10k queries x 512 by default, k = 20, T = 0.07 (DINO's weighted vote). scikit-learn:
``KNeighborsClassifier(algorithm="brute", metric="cosine", weights=lambda d: exp((1 - d) / T))``
(cosine distance d = 1 - s, so the weights are DINO's). Each side is timed ``--repeat`` times
from the raw features (normalisation included) and the best time is kept. Prints the speed-up
and the share of identical predictions.

    python bench/knn.py [--train 60000 --queries 10000 --dim 512 --k 20 --repeat 2 --sweep]

``--sweep`` also times the default ``selfsup-eval`` sweep (k = 10, 20, 100, 200: one pass here,
four ``predict`` calls for scikit-learn). ``--device cuda`` runs selfsup_eval's side on a GPU.
"""

import argparse
import platform
import subprocess
import time

import numpy as np
import torch

from selfsup_io.knn import knn_classify


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def data(n_train, n_query, dim, classes, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yq = torch.randint(0, classes, (n_query,), generator=g)
    xtr = centres[ytr] + noise * torch.randn(n_train, dim, generator=g)
    xq = centres[yq] + noise * torch.randn(n_query, dim, generator=g)
    return xtr, ytr, xq, yq


def best_of(repeat, fn):
    times, out = [], None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=60000)
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--noise", type=float, default=4.5, help="noise std (cluster centres have std 1)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="also time the k = 10 20 100 200 sweep")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    import sklearn
    from sklearn.neighbors import KNeighborsClassifier

    xtr, ytr, xq, yq = data(args.train, args.queries, args.dim, args.classes, args.noise)
    t = args.temperature

    def ours(ks):
        dev = args.device
        ranked = knn_classify(xtr.to(dev), ytr.to(dev), xq.to(dev), ks=ks, temperature=t)
        return {k: r[:, 0].cpu().numpy() for k, r in ranked.items()}

    def theirs(k):
        sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                                  weights=lambda d: np.exp((1 - d) / t))
        return sk.fit(xtr.numpy(), ytr.numpy()).predict(xq.numpy())

    ours((args.k,))  # warm-up (thread pools, GPU context)
    t_ours, p_ours = best_of(args.repeat, lambda: ours((args.k,)))
    t_sk, p_sk = best_of(args.repeat, lambda: theirs(args.k))
    same = np.mean(p_ours[args.k] == p_sk)

    def bare_product():  # the floor: the fp32 similarity product alone, same chunks
        train = torch.nn.functional.normalize(xtr.to(args.device), dim=1)
        for q in xq.to(args.device).split(1024):
            q @ train.T

    t_floor, _ = best_of(args.repeat, bare_product)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"scikit-learn {sklearn.__version__}; selfsup_eval on {args.device}")
    print(f"train {args.train} x {args.dim}, queries {args.queries}, {args.classes} clusters, "
          f"noise {args.noise}, k={args.k}, T={t}; best of {args.repeat}")
    print(f"selfsup_eval knn_classify : {t_ours:8.2f} s   top-1 {np.mean(p_ours[args.k] == yq.numpy()):.4f}")
    print(f"scikit-learn brute/cosine : {t_sk:8.2f} s   top-1 {np.mean(p_sk == yq.numpy()):.4f}")
    print(f"bare fp32 similarity product alone (the floor of any exact method): {t_floor:.2f} s")
    print(f"identical predictions: {same:.4%} ({int((p_ours[args.k] != p_sk).sum())} differ)")
    print(f"speed-up: {t_sk / t_ours:.1f}x")
    if args.sweep:
        ks = (10, 20, 100, 200)
        t_ours_s, p_ours_s = best_of(1, lambda: ours(ks))
        t_sk_s, p_sk_s = best_of(1, lambda: {k: theirs(k) for k in ks})
        agree = np.mean([np.mean(p_ours_s[k] == p_sk_s[k]) for k in ks])
        print(f"sweep k={ks}: selfsup_eval {t_ours_s:.2f} s (one pass), scikit-learn {t_sk_s:.2f} s "
              f"(four predicts); identical {agree:.4%}; speed-up {t_sk_s / t_ours_s:.1f}x")


if __name__ == "__main__":
    main()
