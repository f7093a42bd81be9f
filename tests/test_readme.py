"""Every command the README shows runs as written.

The README's ```sh blocks are taken as they stand and run one after another with bash in one
folder, on the demo corpus, against the real two-node Ray cluster (through ``RAY_ADDRESS``,
which every Ray stage reads). They are shrunk only through what the README documents: the
``STEPS``, ``BOOTSTRAP_STEPS`` and ``SEEDS`` variables. A block that needs what a test cannot have is marked in the
README with ``<!-- readme-test: skip REASON -->`` and is listed here by its first line, so a
block is never skipped silently. Other fences are ```text (output), never commands.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from conftest import REPO, VENV_BIN

README = os.path.join(REPO, "README.md")
FENCE = re.compile(r"(?:<!-- readme-test: skip (?P<why>[^>]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)

SKIPPED = {
    "make demo": "make test runs every test, this README's test among them",
    "pip install -e '.[timm]'": "installs packages",
    ".venv/bin/python benchmarks/experiment_demo.py --workdir work/experiment_demo --publish docs": "a 20-minute benchmark",
}
SHRUNK = {"STEPS": "4", "SEEDS": "1", "BOOTSTRAP_STEPS": "10"}


def readme_blocks() -> list[dict]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    # A block is named by its first command, without its comment.
    return [
        dict(
            lang=m["lang"],
            skip=m["why"],
            body=m["body"],
            first=m["body"].strip().splitlines()[0].split(" #")[0].strip(),
        )
        for m in FENCE.finditer(text)
    ]


def test_every_fence_is_a_command_block_or_output():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for b in blocks:
        assert b["lang"] in ("sh", "text"), f"README block {b['first']!r}: fence it as sh (run by this test) or text"
        assert b["skip"] is None or b["lang"] == "sh"


def test_skipped_blocks_are_exactly_the_named_ones():
    skipped = {b["first"]: b["skip"] for b in readme_blocks() if b["skip"]}
    assert set(skipped) == set(SKIPPED)
    for first, why in skipped.items():
        assert why.startswith(SKIPPED[first]), f"README block {first!r} is skipped for another reason: {why!r}"


def _write_checkpoints(folder: str) -> None:
    """The files the README's import-encoder block names, as a user would have them: a timm ViT
    saved as safetensors and a torchvision ResNet-50 state dict, randomly initialised (nothing
    is downloaded)."""
    import timm
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, os.path.join(folder, "dino_vits16.safetensors"))
    torch.save(torchvision.models.resnet50().state_dict(), os.path.join(folder, "resnet50.pth"))


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_readme_commands_run_as_written(ray_cluster, tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    # What a user's checkout has beside the README: the venv `make` made and the benchmarks folder.
    os.symlink(os.path.dirname(VENV_BIN), work / ".venv")
    os.symlink(os.path.join(REPO, "benchmarks"), work / "benchmarks")
    _write_checkpoints(str(work))
    env = dict(ray_cluster.env, RAY_ADDRESS=ray_cluster.address, PATH=f"{VENV_BIN}:{os.environ['PATH']}", **SHRUNK)
    ran = []
    for block in readme_blocks():
        if block["lang"] != "sh" or block["skip"]:
            continue
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block["body"]],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, (
            f"README block {block['first']!r} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
        ran.append(block["first"])
    assert len(ran) >= 4
    # What the blocks promise is there.
    assert (work / "work" / "steps" / "run" / "encoder.pt").is_file()
    assert (work / "work" / "steps" / "sel" / "tasks" / "digits" / "manifest.jsonl").is_file()
    assert (work / "work" / "steps" / "report" / "index.html").is_file()
    assert (work / "work" / "exp" / "results.json").is_file()
    assert (work / "vit.pt").is_file() and (work / "resnet50.pt").is_file() and (work / "my-node.json").is_file()
