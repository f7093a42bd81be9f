"""Fitting a checkpoint's keys to sept's backbone: ``--key-map FILE`` renames for checkpoints whose
names are their own, and the one-line report of the first key that does not fit.

A key map is a YAML list of ordered regex renames::

    - {from: '^_conv_stem\\.', to: 'conv_stem.'}
    - {from: '^_blocks\\.(\\d+)\\.', to: 'blocks.\\1.'}

Each rule is ``re.sub(from, to, key)`` applied to every key, in the file's order, so a rule sees
the keys as the rules above it left them. Two keys renamed onto one name are refused, since one
of the two weights would be lost without a word.

``check_fit`` compares the renamed state dict with the backbone's own names and shapes before
anything is loaded, and names the first backbone key whose shape differs or that is missing
(with the checkpoint key closest to it among those of its shape, which usually shows the rename
that is needed).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sept.errors import SeptError, first_line


@dataclass(frozen=True)
class KeyRename:
    pattern: re.Pattern
    replacement: str


def read_key_map(path: str) -> list[KeyRename]:
    """The renames of a key-map file; raises ``SeptError`` naming the file and the bad rule."""
    import yaml

    if not os.path.isfile(path):
        raise SeptError(f"key map not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            rules = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise SeptError(f"key map {path} is not YAML: {first_line(err)}") from None
    if not isinstance(rules, list):
        raise SeptError(f"key map {path} must be a YAML list of {{from: PATTERN, to: REPLACEMENT}}")
    out = []
    for i, rule in enumerate(rules, 1):
        if not isinstance(rule, dict) or set(rule) != {"from", "to"}:
            raise SeptError(f"key map {path}: rule {i} must have exactly the fields from and to, got {rule!r}")
        try:
            pattern = re.compile(str(rule["from"]))
        except re.error as err:
            raise SeptError(f"key map {path}: rule {i}: {rule['from']!r} is not a regex ({err})") from None
        out.append(KeyRename(pattern, str(rule["to"])))
    return out


def apply_key_map(state_dict: Mapping[str, torch.Tensor], rules: Sequence[KeyRename]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every key renamed by ``rules`` in order."""
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for key, value in state_dict.items():
        new = key
        for rule in rules:
            new = rule.pattern.sub(rule.replacement, new)
        if new in out:
            raise SeptError(f"the key map renames both {source_of[new]} and {key} to {new}")
        out[new], source_of[new] = value, key
    return out


def check_fit(
    state_dict: Mapping[str, torch.Tensor], backbone: Mapping[str, torch.Tensor], *, source: str, arch: str
) -> list[str]:
    """Raises ``SeptError`` unless every key of ``backbone`` is in ``state_dict`` with its shape;
    returns the checkpoint's keys the backbone has no place for (its classifier), sorted."""
    for key, want in backbone.items():
        got = state_dict.get(key)
        if got is not None and tuple(got.shape) != tuple(want.shape):
            raise SeptError(
                f"{source} does not fit {arch}: size mismatch for {key}: the checkpoint has "
                f"{tuple(got.shape)}, the backbone {tuple(want.shape)}; check --arch"
            )
    missing = [k for k in backbone if k not in state_dict]
    unused = [k for k in state_dict if k not in backbone]
    if missing:
        want = tuple(backbone[missing[0]].shape)
        same_shape = [k for k in unused if tuple(state_dict[k].shape) == want]
        closest = difflib.get_close_matches(missing[0], same_shape or unused, n=1, cutoff=0.0)
        hint = f", closest in the checkpoint: {closest[0]}" if closest else ""
        raise SeptError(
            f"{source} does not fit {arch}: {len(missing)} of its weights are missing "
            f"(first: {missing[0]}{hint}); check --arch, --strip-prefix or --key-map"
        )
    return sorted(unused)
