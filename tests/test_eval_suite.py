"""``selfsup-eval suite``: the VTAB-1k protocol against a plain re-computation on the recorded keys,
draws that are the same for every checkpoint and run, the paired verdict, bad suite files."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup_eval.cli import main
from selfsup_eval.data import shard_samples
from selfsup_eval.suite_data import draw_positions
from selfsup_eval.verdict import paired_stats, verdict
from test_eval_fixtures import export


def write_split(out: Path, split: str, n: int, classes: int = 3, seed: int = 0, size: int = 8,
                noise: float = 80.0) -> Path:
    """A hard little task: a class-dependent brightness pattern under strong noise, so that
    accuracies land well inside (0, 1) and a wrong protocol shows in the numbers."""
    from selfsup.shard_writer import main as shards_main

    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(123).uniform(100, 160, size=(classes, size, size, 3))
    labels = rng.integers(0, classes, n)
    imgs = np.clip(patterns[labels] + rng.normal(0, noise, (n, size, size, 3)), 0, 255).astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"{split}.npz", images=imgs, labels=labels)
    assert shards_main([str(out / f"{split}.npz"), str(out), "--split", split, "--shard-size", "16"]) == 0
    return out / f"{split}.json"


def suite_yaml(path: Path, tasks: list[dict]) -> Path:
    lines = ["tasks:"]
    for t in tasks:
        lines.append(f"  - name: {t['name']}")
        lines += [f"    {k}: {v}" for k, v in t.items() if k != "name"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Two small tasks (the suite file's relative paths are read from its own folder)."""
    root = tmp_path_factory.mktemp("suite")
    write_split(root / "squares", "train", 60, classes=3, seed=0)
    write_split(root / "squares", "test", 60, classes=3, seed=1)
    write_split(root / "quads", "train", 50, classes=4, seed=2)
    write_split(root / "quads", "test", 60, classes=4, seed=3)
    path = suite_yaml(root / "suite.yaml", [
        {"name": "squares", "group": "natural", "train": "squares/train.json", "test": "squares/test.json",
         "n_train": 40, "val_share": 0.25},
        {"name": "quads", "group": "structured", "train": "quads/train.json", "test": "quads/test.json",
         "n_train": 30}])
    ckpt = export(root / "ckpt" / "export" / "backbone.safetensors", size=8)
    return root, path, ckpt


def run_suite(tmp_path, suite_file, *ckpts, extra=()):
    out = tmp_path / "out"
    rc = main(["suite", str(suite_file), *map(str, ckpts), "--out", str(out), "--cache-dir",
               str(tmp_path / "cache"), "--device", "cpu", "--workers", "1", *extra])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def pixels(url_index: Path) -> dict:
    """key → (flattened [0, 1] pixels, label), decoded here with PIL (independent of the evaluator)."""
    from selfsup_io.shards import resolve_shards

    out = {}
    for url in resolve_shards(str(url_index)).urls:
        for raw in shard_samples(url):
            img = np.asarray(Image.open(io.BytesIO(raw["png"])).convert("RGB"), dtype=np.float32) / 255
            out[raw["__key__"]] = (torch.from_numpy(img.transpose(2, 0, 1).copy()).flatten(), int(raw["cls"]))
    return out


def loop_knn(train, test, k, t):
    """The weighted k-NN written out: cosine, k nearest, vote exp(s/T), the largest sum wins."""
    hits = 0
    for q, qy in test:
        sims = sorted(((float(torch.dot(q / q.norm(), x / x.norm())), y) for x, y in train), key=lambda s: -s[0])
        votes = {}
        for s, y in sims[:k]:  # exp((s - s_1)/T): the same ranking as exp(s/T), no overflow at T=1e-4
            votes[y] = votes.get(y, 0.0) + math.exp((s - sims[0][0]) / t)
        hits += max(votes, key=votes.get) == qy
    return hits / len(test)


def test_protocol_equals_a_recomputation_on_the_recorded_keys(tmp_path, suite):
    root, path, _ = suite
    out, records = run_suite(tmp_path, path, "raw-pixels")
    r = records[0]["suite"]["tasks"]["squares"]
    assert r["group"] == "natural" and r["n_train"] == 40 and r["n_test"] == 60
    assert r["keys"] == ["keys/squares-subset0.txt"]
    keys = (out / r["keys"][0]).read_text().split()
    assert len(keys) == len(set(keys)) == 40
    # the keys are the documented draw: positions of a permutation seeded from "squares|0"
    assert keys == [f"train-{p:08d}" for p in draw_positions("squares", 0, 60, 40)]
    px_train, px_test = pixels(root / "squares" / "train.json"), pixels(root / "squares" / "test.json")
    train = [px_train[k] for k in keys]
    test = list(px_test.values())
    knn = r["knn"]
    assert knn["top1"] == pytest.approx(loop_knn(train, test, knn["k"], knn["temperature"]))
    # the k and T were chosen on the first 30 → the last 10 (val_share 0.25): their held-out top-1
    assert knn["holdout_top1"] == pytest.approx(loop_knn(train[:30], train[30:], min(knn["k"], 30), knn["temperature"]))
    # linear: scikit-learn's logistic regression with the recorded penalty, on all 40, standardised
    from sklearn.linear_model import LogisticRegression

    x = torch.stack([f for f, _ in train]).double()
    y = np.array([c for _, c in train])
    tx = torch.stack([f for f, _ in test]).double()
    ty = np.array([c for _, c in test])
    mean, std = x.mean(0), x.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    sk = LogisticRegression(C=1 / (len(x) * r["linear"]["wd"]), max_iter=5000, tol=1e-8)
    sk.fit(((x - mean) / std).numpy(), y)
    acc = (sk.predict(((tx - mean) / std).numpy()) == ty).mean()
    assert abs(r["linear"]["top1"] - acc) <= 1 / len(ty) + 1e-9
    assert 0.2 < r["knn"]["top1"] < 0.95 and 0.2 < acc < 0.95  # neither trivial nor hopeless
    assert set(r["knn_linear"]) >= {"top1", "lambda", "k", "temperature"}
    s = records[0]["suite"]
    assert s["groups"]["natural"]["linear"] == r["linear"]["top1"]
    assert s["mean"]["knn"] == pytest.approx((r["knn"]["top1"] + s["tasks"]["quads"]["knn"]["top1"]) / 2)
    assert (out / "suite.csv").read_text().count("\n") == 1 + 3 and (out / "suite.png").stat().st_size > 0
    assert "Transfer suite" in (out / "report.html").read_text()


def zeroed(src: Path, dst: Path) -> Path:
    """The same export with every weight 0: constant features, a chance-level backbone."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(src)).items()}, str(dst), metadata=meta)
    return dst


def test_draws_are_the_same_for_every_checkpoint_and_run_and_differ_across_subsets(tmp_path, suite):
    _, path, ckpt = suite
    out, records = run_suite(tmp_path, path, "raw-pixels", ckpt, extra=["--subsets", "2"])
    first = {f: (out / "keys" / f).read_text() for f in ("squares-subset0.txt", "squares-subset1.txt")}
    assert first["squares-subset0.txt"] != first["squares-subset1.txt"]
    for r in records:  # one set of keys files serves every checkpoint
        assert r["suite"]["tasks"]["squares"]["keys"] == ["keys/squares-subset0.txt", "keys/squares-subset1.txt"]
        knn = r["suite"]["tasks"]["quads"]["knn"]
        runs = [s["top1"] for s in knn["subsets"]]
        assert knn["top1"] == pytest.approx(sum(runs) / 2) and knn["std"] == pytest.approx(float(torch.tensor(runs).std()))
    again = tmp_path / "again"
    again.mkdir()
    out2, records2 = run_suite(again, path, ckpt, extra=["--subsets", "2"])  # another run, other order
    assert {f: (out2 / "keys" / f).read_text() for f in first} == first
    assert records2[0]["suite"]["tasks"] == records[1]["suite"]["tasks"]


def test_a_checkpoint_against_itself_is_exactly_zero_and_a_chance_backbone_is_worse(tmp_path, suite, capsys):
    _, path, ckpt = suite
    dead = zeroed(ckpt, tmp_path / "dead" / "export" / "backbone.safetensors")
    out, records = run_suite(tmp_path, path, "raw-pixels", "raw-pixels", dead, extra=["--protocols", "knn", "linear"])
    same = records[1]["verdict"]
    assert same["reference"] == "raw-pixels" and same["protocol"] == "linear"
    assert same["difference"] == 0.0 and same["interval"] == [0.0, 0.0] and same["word"] == "no clear difference"
    assert all(v["difference"] == 0.0 for v in records[1]["verdicts"].values())
    bad = records[2]["verdicts"]
    for p in ("knn", "linear"):
        mine = [records[2]["suite"]["tasks"][t][p]["top1"] - records[0]["suite"]["tasks"][t][p]["top1"]
                for t in ("squares", "quads")]
        assert bad[p]["difference"] == pytest.approx(sum(mine) / 2)
        assert bad[p]["word"] == "worse" and bad[p]["interval"][1] < 0
    printed = capsys.readouterr().out
    assert "verdict (linear) (headline): dead@1 vs raw-pixels" in printed and ": worse" in printed
    # the same pair seen from the other side, with --reference naming the chance backbone
    _, flipped = run_suite(tmp_path / "f", path, "raw-pixels", dead, extra=["--protocols", "linear", "--reference", "dead@1"])
    assert flipped[0]["verdict"]["word"] == "better" and "verdict" not in flipped[1]


def test_verdict_against_a_slow_paired_bootstrap_loop():
    rng = np.random.default_rng(0)
    per_task, ref_runs = {}, {}
    for t in range(4):
        a = torch.from_numpy(rng.random(200) < 0.6)
        b = torch.from_numpy(rng.random(200) < 0.6 + 0.05 * t)
        per_task[f"t{t}"] = [paired_stats(b, a)]
        ref_runs[f"t{t}"] = (b.double() - a.double())
    v = verdict(per_task, "ref", replicates=4000)
    assert v["difference"] == pytest.approx(float(np.mean([d.mean() for d in ref_runs.values()])))
    # the spread: tasks resampled and the test-set noise sd/sqrt(n), written out
    g = np.random.default_rng(1)
    m = np.array([float(d.mean()) for d in ref_runs.values()])
    se = np.array([float(d.std()) / np.sqrt(200) for d in ref_runs.values()])
    reps = []
    for _ in range(4000):
        pick = g.integers(0, 4, 4)
        reps.append(np.mean(m[pick] + se[pick] * g.standard_normal(4)))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert v["interval"][0] == pytest.approx(lo, abs=0.01) and v["interval"][1] == pytest.approx(hi, abs=0.01)
    clear = verdict({f"t{t}": [(0.1 + 0.01 * t, 0.01)] for t in range(5)}, "ref")
    assert clear["word"] == "better" and clear["interval"][0] > 0


def bad_suite(tmp_path, suite, capsys, monkeypatch, tasks=None, text=None):
    import selfsup_eval.features as features

    def boom(*a, **k):
        raise AssertionError("extracted before the suite file was checked")

    monkeypatch.setattr(features, "extract", boom)
    root = suite[0]
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    else:
        suite_yaml(path, tasks)
    rc = main(["suite", str(path), "raw-pixels", "--out", str(tmp_path / "o"), "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("selfsup-eval: error: ")
    return err


def task(root, **kw):
    return {"name": "dtd", "group": "natural", "train": f"{root}/squares/train.json",
            "test": f"{root}/squares/test.json", "n_train": 40, **kw}


def test_bad_suite_files_are_one_line_naming_the_task(tmp_path, suite, capsys, monkeypatch):
    root = suite[0]
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, [task(root, epochs=3)])
    assert "task dtd: unknown key(s) epochs" in err
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, [task(root, train=f"{root}/nowhere/train.json")])
    assert "task dtd: train:" in err and "nowhere" in err
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, [task(root, n_train=61)])
    assert "task dtd: the train split has 60 samples, fewer than n_train 61" in err
    unlabelled = tmp_path / "unl"
    unlabelled.mkdir()
    np.savez(unlabelled / "u.npz", images=np.zeros((20, 8, 8, 3), np.uint8))
    from selfsup.shard_writer import main as shards_main

    assert shards_main([str(unlabelled / "u.npz"), str(unlabelled), "--split", "test"]) == 0
    capsys.readouterr()
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, [task(root, test=f"{unlabelled}/test.json")])
    assert "task dtd: test shards" in err and "have no labels" in err
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, [task(root), task(root)])
    assert "task dtd: appears twice" in err
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, [task(root, val_share=1.5)])
    assert "task dtd: val_share 1.5" in err
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, [{k: v for k, v in task(root).items() if k != "test"}])
    assert "task dtd: missing test" in err
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, text="task:\n  - name: x\n")
    assert "unknown key(s) task" in err
    err = bad_suite(tmp_path, suite, capsys, monkeypatch, text="tasks:\n  - name: x\n    train: ${oc.env:NO_SUCH_ROOT_XYZ}/a\n")
    assert "cannot read the suite file" in err and "NO_SUCH_ROOT_XYZ" in err
    suite_yaml(tmp_path / "ok.yaml", [task(root)])  # a fine file, a --reference that names nothing
    rc = main(["suite", str(tmp_path / "ok.yaml"), "raw-pixels", "--out", str(tmp_path / "o"), "--reference", "nope"])
    assert rc == 2 and "--reference nope: matches none of the checkpoints (raw-pixels)" in capsys.readouterr().err


def test_subset_file_names_keys_or_source_file_names(tmp_path, capsys):
    """--subset-file: a fixed list, by sample key or by the file name a folder was written from."""
    from selfsup.shard_writer import main as shards_main
    from selfsup_io.knn import knn_classify, topk_accuracy

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 8)):
        folder = tmp_path / split
        for c in range(3):
            (folder / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(60 + 50 * c, 60, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"c{c}" / f"img_{c}_{i}.png")
        assert shards_main([str(folder), str(tmp_path / "s"), "--split", split]) == 0
    chosen = ["img_0_1.png", "img_0_4", "img_1_2.png", "img_1_7.png", "img_2_0.png", "img_2_9.png"]
    (tmp_path / "names.txt").write_text("# six images\n" + "\n".join(chosen) + "\n")
    args = ["knn", "raw-pixels", "--train", str(tmp_path / "s" / "train.json"), "--val",
            str(tmp_path / "s" / "val.json"), "--no-cache", "--device", "cpu", "--k", "3", "--out", str(tmp_path / "o")]
    assert main(args + ["--subset-file", str(tmp_path / "names.txt")]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())[0]["lowshot"]["file:names.txt"]
    assert res["subsets"] == 1 and res["train_samples"] == 6 and res["knn"]["std"] == 0.0
    px_train, px_val = pixels(tmp_path / "s" / "train.json"), pixels(tmp_path / "s" / "val.json")
    from selfsup_eval.data import shard_samples as samples
    from selfsup_io.shards import resolve_shards

    path_of = {json.loads(r["json"])["path"].split("/")[-1]: r["__key__"]
               for u in resolve_shards(str(tmp_path / "s" / "train.json")).urls for r in samples(u)}
    keys = [path_of[n if n.endswith(".png") else n + ".png"] for n in chosen]
    x = torch.stack([px_train[k][0] for k in keys])
    y = torch.tensor([px_train[k][1] for k in keys])
    vx = torch.stack([f for f, _ in px_val.values()])
    vy = torch.tensor([c for _, c in px_val.values()])
    want = topk_accuracy(knn_classify(x, y, vx, ks=(res["knn_k"],))[res["knn_k"]], vy, 1)
    assert res["knn"]["mean"] == pytest.approx(want)
    (tmp_path / "keys.txt").write_text("\n".join(keys))  # the same subset by key
    assert main(args + ["--subset-file", str(tmp_path / "keys.txt")]) == 0
    by_key = json.loads((tmp_path / "o" / "results.json").read_text())[0]["lowshot"]["file:keys.txt"]
    assert by_key["knn"]["runs"] == res["knn"]["runs"]
    (tmp_path / "bad.txt").write_text("img_0_1.png\nnot_there.png\n")
    capsys.readouterr()
    assert main(args + ["--subset-file", str(tmp_path / "bad.txt")]) == 2
    assert "1 of 2 line(s) name no train sample (e.g. 'not_there.png')" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("# nothing\n")
    assert main(args + ["--subset-file", str(tmp_path / "empty.txt")]) == 2
    assert "lists no image" in capsys.readouterr().err


def test_cpu_suite_tasks_are_balanced_reproducible_and_named_by_the_suite_file(tmp_path):
    import sys

    from selfsup_eval.suite_file import load_suite

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import cpu_suite

    for task, classes in cpu_suite.GENERATED.items():
        x, y = cpu_suite.generated(task, 300, 0)
        assert x.shape == (300, 28, 28) and x.dtype == np.uint8
        counts = np.bincount(y, minlength=classes)
        assert len(counts) == classes and counts.min() > 300 / classes / 2  # every class, none rare
        assert np.array_equal(cpu_suite.generated(task, 300, 0)[0], x)  # seeded
    x, y = cpu_suite.count_item(np.random.default_rng(3))
    # count: the label is the number of bright blobs, counted here with scipy's labelling
    from scipy import ndimage

    assert ndimage.label(x > 120)[1] == y + 1
    tasks = load_suite(str(Path(__file__).resolve().parents[1] / "suites" / "cpu.yaml"), check_data=False)
    assert [t.name for t in tasks] == ["fmnist", "digits", *cpu_suite.GENERATED]
    assert {t.name: t.augment for t in tasks}["orientation"] == "crop"


def test_a_task_input_size_resizes_and_a_fixed_size_model_is_one_line(tmp_path, suite, capsys):
    root, _, ckpt = suite
    path = suite_yaml(tmp_path / "sized.yaml", [
        {"name": "squares", "group": "natural", "train": f"{root}/squares/train.json",
         "test": f"{root}/squares/test.json", "n_train": 40, "input_size": 16}])
    _, records = run_suite(tmp_path, path, ckpt, extra=["--protocols", "knn"])
    assert 0 <= records[0]["suite"]["tasks"]["squares"]["knn"]["top1"] <= 1
    vit = export(tmp_path / "vit" / "export" / "backbone.safetensors", name="vit_tiny_patch16_224", size=8,
                 pool="mean_patch", kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1,
                                            "num_heads": 2, "class_token": False, "global_pool": "avg"})
    capsys.readouterr()
    rc = main(["suite", str(path), str(vit), "--out", str(tmp_path / "v"), "--no-cache", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "task squares: input_size 16:" in err


def test_a_draw_reads_only_the_shards_that_hold_it(tmp_path, suite, monkeypatch):
    import selfsup_eval.data as data
    from selfsup_eval.suite_data import prepare_draws
    from selfsup_eval.suite_file import load_suite

    root = suite[0]
    path = suite_yaml(tmp_path / "s.yaml", [{"name": "tiny", "group": "natural", "train": f"{root}/squares/train.json",
                                              "test": f"{root}/squares/test.json", "n_train": 2}])
    task = load_suite(str(path))[0]
    read, real = [], data.shard_samples

    def spy(url):
        read.append(url)
        return real(url)

    monkeypatch.setattr(data, "shard_samples", spy)
    draw = prepare_draws(task, 1, tmp_path / "out")[0]
    positions = draw_positions("tiny", 0, 60, 2)
    assert draw.keys == [f"train-{p:08d}" for p in positions]
    held = {p // 16 for p in positions}  # shards of 16 samples
    copied = [u for u in read if "subsets" in u]
    assert sorted(u for u in read if u not in copied) == sorted(task.train.urls[i] for i in held)
