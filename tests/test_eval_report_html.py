"""`selfsup-eval all --out DIR` pictures and DIR/report.html: files, sizes, the seeded query
selection, every referenced file present, the suite section, and the page in headless Chromium."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup_eval.cli import main
from selfsup_eval.html import render, write_report
from selfsup_eval.pictures import nearest, select_queries
from test_eval_fixtures import export_step, write_split

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    train = write_split(root / "data", "train", 64, shard_size=16, classes=4)
    val = write_split(root / "data", "val", 24, shard_size=16, classes=4, seed=1)
    run = root / "run"
    for step in (4, 8):
        export_step(run, step, seed=step)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "time": 0, "loss": 4 - s / 4, "lr": 0.01 * s, "epoch": s / 8,
                    **({"monitor/knn_top1": 0.5 + s / 20, "monitor/feature_std": 0.1,
                        "monitor/rankme": 3.0 + s} if s % 2 == 0 else {})}) + "\n" for s in range(1, 9)))
    out = root / "out"
    assert main(["all", str(run), "--baseline", "raw-pixels", "--train", str(train), "--val", str(val),
                 "--k", "3", "--out", str(out), "--no-cache"]) == 0
    return out


def test_pictures_are_written_at_their_sizes(report):
    sizes = {"neighbours.png": (1080, 4 * 130), "map.png": (700, 600), "confusion.png": (700, 600),
             "curves.png": (900, 600), "accuracy_vs_step.png": (700, 450)}
    for name, size in sizes.items():
        path = report / name
        assert path.stat().st_size > 5000, name
        with Image.open(path) as img:
            assert img.size == size, name
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_query_selection_is_seeded_one_per_class_and_neighbours_are_nearest():
    labels = np.repeat(np.arange(12), 5)[np.random.default_rng(3).permutation(60)]
    a, b = select_queries(labels), select_queries(labels)
    assert a == b and len(a) == 8 and len({int(labels[i]) for i in a}) == 8  # 8 of 12 classes
    assert [int(labels[i]) for i in a] == sorted(int(labels[i]) for i in a)
    assert select_queries(labels, seed=1) != a
    few = np.array([2, 0, 2, 0, 5])
    assert sorted(int(few[i]) for i in select_queries(few)) == [0, 2, 5]  # every class, 3 < 8
    x = torch.randn(30, 6)
    q = torch.randn(4, 6)
    got = nearest(x, q, 5)
    for i in range(4):
        cos = [float(q[i] @ x[j] / q[i].norm() / x[j].norm()) for j in range(30)]
        assert got[i].tolist() == sorted(range(30), key=lambda j: -cos[j])[:5]


def referenced(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def test_report_references_only_files_next_to_it(report):
    page = (report / "report.html").read_text()
    refs = referenced(page)
    assert sorted(refs) == sorted(["neighbours.png", "map.png", "confusion.png", "curves.png",
                                   "accuracy_vs_step.png"])
    for ref in refs:
        assert (report / ref).is_file() and "://" not in ref  # nothing from a network
    assert "protocol: frozen backbone" in page and page.count("<figcaption>") == len(refs)
    assert "t-SNE" in page and "run@8" in page and "mAP@R" in page


def suite_record(name, knn, verdict=None):
    tasks = {"count": {"group": "structured", "n_train": 800, "n_test": 200, "knn": {"top1": knn, "k": 20},
                       "linear": {"top1": knn + 0.05}, "keys": ["a.txt"]},
             "pets": {"group": "natural", "n_train": 1000, "n_test": 500, "knn": {"top1": 0.5},
                      "linear": {"top1": 0.6}, "finetune": {"top1": 0.7}, "keys": []}}
    r = {"name": name, "step": 1, "objective": "simclr", "knn": {"k=20": knn},
         "suite": {"tasks": tasks, "groups": {"structured": knn, "natural": 0.5}, "mean": (knn + 0.5) / 2}}
    if verdict:
        r["verdict"] = verdict
    return r


def test_suite_records_render_a_table_and_the_verdict(tmp_path):
    records = [suite_record("raw-pixels", 0.25),
               suite_record("demo@585", 0.4, {"reference": "raw-pixels", "difference": 0.0734,
                                              "interval": [0.021, 0.118], "word": "better"})]
    page = render(records, "protocol: test")
    assert page.count('<table class="suite">') == 2
    assert "<td>count</td><td>structured</td><td>800</td><td>200</td><td>40.00</td><td>45.00</td>" in page
    assert "<td>70.00</td>" in page and "<td>mean</td>" in page  # finetune column; overall mean
    assert "verdict against raw-pixels: better (difference +7.34, 95 % interval [+2.10, +11.80] points)" in page
    assert "Transfer suite" not in render([{"name": "y"}])  # a record without step or suite renders
    path = write_report(tmp_path, records, "protocol: test", ["missing.png"])
    assert referenced(path.read_text()) == []  # a picture that is not there is not referenced


CHECK = ('<script>window.addEventListener("load",function(){var p=document.createElement("pre");'
         'p.id="check";p.textContent=JSON.stringify({images:Array.from(document.images).map(function(i)'
         '{return [i.getAttribute("src"),i.naturalWidth,i.naturalHeight]}),rows:Array.from('
         'document.querySelectorAll("table.results tbody tr")).map(function(r){return r.cells[0].textContent})});'
         'document.body.appendChild(p);});</script>')


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it as root)")
def test_report_in_headless_chromium_loads_every_image_and_the_rows(report, tmp_path):
    page = (report / "report.html").read_text()
    probe = report / ".chromium-check.html"  # next to the page: the same relative paths
    # an image that cannot load proves a failed load reads as naturalWidth 0
    probe.write_text(page.replace("</body>", '<img src="no-such.png">' + CHECK + "</body>"))
    try:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                            f"--user-data-dir={tmp_path / 'profile'}", probe.as_uri()],
                           capture_output=True, text=True, timeout=120)
        shot = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                               f"--screenshot={tmp_path / 'page.png'}", (report / "report.html").as_uri()],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        probe.unlink()
    m = re.search(r'<pre id="check">(.*?)</pre>', r.stdout)
    assert m, r.stdout[-2000:] + r.stderr[-2000:]
    import html

    check = json.loads(html.unescape(m.group(1)))
    images = {src: (w, h) for src, w, h in check["images"]}
    assert images.pop("no-such.png") == (0, 0)
    assert set(images) == {"neighbours.png", "map.png", "confusion.png", "curves.png", "accuracy_vs_step.png"}
    assert all(w > 0 and h > 0 for w, h in images.values()), images
    assert images["map.png"] == (700, 600)
    assert check["rows"] == ["raw-pixels", "run@4", "run@8"]
    assert shot.returncode == 0 and (tmp_path / "page.png").stat().st_size > 10000


def test_thumbnails_found_by_key_with_or_without_shard_hints(report):
    from selfsup_eval.pictures import thumbnails
    from selfsup_io.shards import resolve_shards

    urls = resolve_shards(str(report.parent / "data" / "train.json")).urls  # 4 shards of 16
    wanted = {"train-00000003": 3, "train-00000050": 50}
    hinted = thumbnails(urls, wanted, {"train-00000003": 0, "train-00000050": 3})
    scanned = thumbnails(urls, wanted, None)
    assert set(hinted) == set(scanned) == set(wanted)
    for k in wanted:
        assert hinted[k].shape == (16, 16, 3) and np.array_equal(hinted[k], scanned[k])


def test_knn_mode_page_shows_no_stale_pictures(report, tmp_path):
    data = report.parent / "data"
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(report / "map.png", out / "map.png")  # left over from an earlier `all`
    assert main(["knn", "raw-pixels", "--train", str(data / "train.json"), "--val", str(data / "val.json"),
                 "--k", "3", "--out", str(out), "--no-cache"]) == 0
    page = (out / "report.html").read_text()
    assert referenced(page) == [] and "<td>raw-pixels</td>" in page
