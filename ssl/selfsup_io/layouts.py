"""Where a backbone sits in another framework's checkpoint: one detection for every reader.

The evaluator (``--model``), ``selfsup-export`` and the trainer's ``model.init`` all find the
weights the same way, in two steps, each overridable (as DINO's eval scripts: ``--checkpoint_key``,
then stripping ``module.`` and ``backbone.``):

1. **which state dict** (``--checkpoint-key`` / ``model.init_key``): the file itself when it is a
   flat name → tensor map, else the first of :data:`STATE_KEYS` that holds one (``state_dict``:
   timm, torchvision references, official MoCo, solo-learn and other Lightning checkpoints;
   ``teacher``: DINO; ``target_encoder``: I-JEPA, whose evaluations use the target encoder;
   ``encoder``...), else the only one there is;
2. **which prefix** (``--prefix`` / ``model.init_prefix``): the one that maps the most checkpoint
   names, with matching shapes, onto the model's names, ties broken by :data:`PREFERRED` (the
   query encoder ``module.encoder_q.`` over MoCo's key encoder, ``backbone.`` over
   ``momentum_backbone.``...); a tie it does not break (BYOL's ``online_network.`` and
   ``target_network.``) is a one-line error naming the prefixes, never a guess.
   A name may also address the model's children by position, as lightly's examples do with
   ``nn.Sequential(*list(resnet.children())[:-1])`` (``backbone.4.0.conv1.weight`` is
   ``layer1.0.conv1.weight``); that reading is tried too.

A model weight the checkpoint does not provide, or provides with another shape, is an error,
never a silently random backbone. Files are opened by :mod:`selfsup_io.safe_load` only.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from selfsup_io.errors import LoadError
from selfsup_io.weights import weight_problem

STATE_KEYS = ("state_dict", "model", "teacher", "target_encoder", "encoder", "model_state", "module",
              "net", "network", "student")
PREFERRED = ("", "module.", "backbone.", "module.backbone.", "encoder_q.", "module.encoder_q.",
             "encoder.vit.", "model.", "module.model.", "encoder.", "module.encoder.", "base_encoder.",
             "module.base_encoder.", "model.backbone.", "teacher.backbone.")


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values()) \
        and all(isinstance(k, str) for k in obj)


def pick_state_dict(obj, key: str | None = None, where: str = "checkpoint",
                    key_flag: str = "--checkpoint-key") -> tuple[dict, str | None]:
    """``(state dict, the key it was under or None for the top level)``; ``key_flag`` is how the
    user names the key in messages (the trainer's ``model.init_key``)."""
    if key:
        if not isinstance(obj, dict) or key not in obj:
            have = ", ".join(map(str, list(obj)[:12])) if isinstance(obj, dict) else type(obj).__name__
            raise LoadError(f"{where}: {key_flag} {key!r} is not in the checkpoint (it has: {have})")
        if not is_state_dict(obj[key]):
            raise LoadError(f"{where}: {key_flag} {key!r} does not hold a name -> tensor state dict")
        return obj[key], key
    if is_state_dict(obj):
        return obj, None
    if not isinstance(obj, dict):
        raise LoadError(f"{where} holds a {type(obj).__name__}, not a state dict or a dict of them")
    for k in STATE_KEYS:
        if is_state_dict(obj.get(k)):
            return obj[k], k
    found = [k for k, v in obj.items() if is_state_dict(v)]
    if len(found) == 1:
        return obj[found[0]], found[0]
    raise LoadError(f"{where}: cannot tell which state dict holds the backbone (candidates: "
                    f"{', '.join(map(str, found)) or 'none'}); pass {key_flag}")


def _children_form(key: str, children: list[str]) -> str | None:
    """``backbone.4.0.conv1.weight`` → ``backbone.layer1.0.conv1.weight``: the first numeric
    component read as the index of a top-level child of the model (lightly's Sequential)."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            if int(p) < len(children):
                return ".".join(parts[:i] + [children[int(p)]] + parts[i + 1:])
            return None
    return None


def _rank(prefix: str) -> int:
    return PREFERRED.index(prefix) if prefix in PREFERRED else len(PREFERRED)


def match_keys(state: dict, model: nn.Module, prefix: str | None = None) -> dict:
    """Map checkpoint names onto the model's. Returns ``{"mapped": {model name: tensor},
    "prefix", "positional", "unused": [checkpoint names], "mismatched": [names]}``."""
    target = {k: v.shape for k, v in model.state_dict().items()}
    children = [n for n, _ in model.named_children()]
    forms = {"direct": {k: k for k in state}, "positional": {}}
    for k in state:
        alt = _children_form(k, children)
        if alt is not None:
            forms["positional"][k] = alt
    best, seen = None, []
    for form, names in forms.items():
        counts = Counter()
        for orig, name in names.items():
            parts = name.split(".")
            for i in range(len(parts)):
                suffix, pre = ".".join(parts[i:]), ".".join(parts[:i]) + ("." if i else "")
                if suffix in target and tuple(target[suffix]) == tuple(state[orig].shape):
                    counts[pre] += 1
        if prefix is not None:
            counts = Counter({prefix: counts.get(prefix, 0)})
        for pre, n in counts.items():
            cand = (n, -_rank(pre), form == "direct")
            seen.append((cand[:2], pre))
            if best is None or cand > best[0]:
                best = (cand, form, pre)
    if best is None:
        return {"mapped": {}, "prefix": prefix or "", "positional": False, "unused": list(state), "mismatched": []}
    cand, form, pre = best
    # another prefix maps as many tensors and PREFERRED does not rank either (BYOL's
    # online_network. vs target_network.): which encoder is evaluated must not be a dict order
    ambiguous = sorted({p for c, p in seen if c == cand[:2] and p != pre})
    mapped, unused, mismatched = {}, [], []
    for orig, name in forms[form].items():
        if name.startswith(pre) and name[len(pre):] in target:
            sub = name[len(pre):]
            if tuple(target[sub]) == tuple(state[orig].shape):
                mapped[sub] = state[orig]
                continue
            mismatched.append(f"{orig} {tuple(state[orig].shape)} vs {tuple(target[sub])}")
        unused.append(orig)
    unused += [k for k in state if k not in forms[form]]
    return {"mapped": mapped, "prefix": pre, "positional": form == "positional", "unused": unused,
            "mismatched": mismatched, "ambiguous": ambiguous}


def load_weights(model: nn.Module, state: dict, where: str, prefix: str | None = None,
                 flags: tuple[str, str, str] = ("--model/--model-kwargs", "--checkpoint-key", "--prefix")) -> dict:
    """Copy the checkpoint's backbone weights into ``model``; error if any stays uninitialised.
    ``flags``: how the user names the model, the key and the prefix (the trainer's recipe keys)."""
    m = match_keys(state, model, prefix)
    if m.get("ambiguous"):
        names = ", ".join(repr(p) for p in sorted([m["prefix"], *m["ambiguous"]]))
        raise LoadError(f"{where}: prefixes {names} each hold {len(m['mapped'])} of the model's weights: "
                        f"pass {flags[2]} to choose the encoder")
    missing = [k for k in model.state_dict() if k not in m["mapped"] and not k.endswith("num_batches_tracked")]
    if missing:
        hint = f"; shapes differ: {', '.join(m['mismatched'][:3])}" if m["mismatched"] else ""
        raise LoadError(f"{where}: {len(missing)} of the model's {len(model.state_dict())} weights would stay "
                        f"uninitialised (e.g. {', '.join(missing[:3])}) with prefix {m['prefix']!r}{hint}: "
                        f"not a backbone of this model (check {', '.join(flags)})")
    if (why := weight_problem(m["mapped"], model.state_dict())) is not None:
        raise LoadError(f"{where}: {why}: refusing to use it")
    model.load_state_dict(m["mapped"], strict=False)
    return m


def unused_note(where: str, m: dict, key: str | None) -> str:
    """The one-line report of what was taken and what was left."""
    src = f"'{key}'" if key else "the top level"
    how = " (children by position)" if m["positional"] else ""
    left = (f"; {len(m['unused'])} checkpoint tensor(s) not used, e.g. {', '.join(m['unused'][:4])}"
            if m["unused"] else "; every checkpoint tensor used")
    return f"{where}: {len(m['mapped'])} tensors from {src}, prefix {m['prefix']!r}{how}{left}"
