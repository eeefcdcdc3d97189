"""RUN_DIR/export/hf is timm's Hugging Face layout, loaded by timm alone (no selfsup on the path)
to exactly the features of backbone.safetensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT
from selfsup.cli import train_main

TINY = str(ROOT / "recipes" / "tiny.yaml")

TIMM_ONLY = r"""
import json, sys
import timm, torch
from safetensors.torch import load_file
hf, reference, out = sys.argv[1:4]
assert not any("selfsup" in m for m in sys.modules)
by_config = timm.create_model(f"local-dir:{hf}", pretrained=True).eval()
by_name = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=f"{hf}/model.safetensors")).eval()
cfg = timm.data.resolve_data_config({}, model=by_config)
x = torch.randn(3, *cfg["input_size"], generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save({"config": by_config(x), "name": by_name(x), "x": x, "data": cfg}, out)
assert not any(m.startswith("selfsup") for m in sys.modules)
"""


def test_hf_folder_loads_with_timm_alone_and_matches_the_export(tmp_path, shards):
    run = tmp_path / "run"
    assert train_main([TINY, f"data.train={shards}", f"run.dir={run}", "train.max_steps=2",
                       "augment.mean=[0.5,0.4,0.3]", "augment.std=[0.2,0.25,0.3]"]) == 0
    hf = run / "export" / "hf"
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((hf / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.4, 0.3]
    assert config["pretrained_cfg"]["crop_pct"] == 1.0
    assert oct(os.stat(hf / "model.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())

    script = tmp_path / "timm_only.py"
    script.write_text(TIMM_ONLY)
    out = tmp_path / "features.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-S", "-c",  # no site: selfsup's editable install stays out
                    f"import sys; sys.path[:0] = {_site_without_selfsup()!r}; "
                    f"exec(open({str(script)!r}).read())", str(hf),
                    str(run / "export" / "backbone.safetensors"), str(out)],
                   env=env, check=True, cwd=tmp_path, timeout=300)
    got = torch.load(out)
    assert list(got["data"]["mean"]) == [0.5, 0.4, 0.3] and list(got["data"]["input_size"]) == [3, 16, 16]

    import timm
    from safetensors.torch import load_file

    reference = timm.create_model("test_resnet", num_classes=0).eval()
    reference.load_state_dict(load_file(str(run / "export" / "backbone.safetensors")))
    with torch.no_grad():
        expected = reference(got["x"])
    assert torch.equal(got["config"], expected) and torch.equal(got["name"], expected)


def test_small_stem_backbones_get_no_hf_folder(tmp_path, shards):
    run = tmp_path / "run"
    assert train_main([TINY, f"data.train={shards}", f"run.dir={run}", "train.max_steps=1",
                       "model.name=resnet10t", "model.small_stem=true"]) == 0
    assert (run / "export" / "backbone.safetensors").is_file()
    assert not (run / "export" / "hf").exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _site_without_selfsup() -> list[str]:
    """This interpreter's library folders, without the repository's source roots (run with -S,
    so the editable install's path hook is not loaded either)."""
    roots = [str(ROOT / d) for d in ("ssl", "eval", "tests")] + [str(ROOT)]
    return [p for p in sys.path if p and p not in roots and "__editable__" not in p]
