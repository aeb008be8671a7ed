"""ACAS Xu use case: model export and data, from the reference networks in a setting (never copied here).

    python use_cases/acas_xu/acas.py [--network 1_1]     # writes artefacts/acasxu_<network>.pt

The data folder is $TRUSTCASE_ACASXU (default <repo>/../shared/acasxu). The exported TorchScript model
takes NORMALISED inputs (as the VNN-LIB properties do) and returns MINUS the normalised scores, so that
the arg-max of the "logits" is the advisory (the lowest score) and every generic check reads it right;
the `formal_properties` check is told so (`outputs: negated_scores`).

The data are points sampled uniformly (seeded, per split) in the operational domain: the box of the
network's declared input ranges, normalised. Labels are the network's own advisory: accuracy is then
trivially 1, and certified accuracy is a certified local-robustness rate (the advisory cannot change
within the radius). There is no ground truth (the original look-up table is not public).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trustcase.certification.nnet import read_nnet
from trustcase.data.streaming import Item

HERE = Path(__file__).resolve().parent
ADVISORIES = ["clear_of_conflict", "weak_left", "weak_right", "strong_left", "strong_right"]
SIZES = {"train": 512, "validation": 256, "test": 512}
SEEDS = {"train": 1, "validation": 2, "test": 3}


def root() -> Path:
    path = Path(os.environ.get("TRUSTCASE_ACASXU") or HERE.parent.parent.parent / "shared" / "acasxu")
    if not (path / "nnet").is_dir():
        raise OSError(f"ACAS Xu data not found at {path}: set TRUSTCASE_ACASXU to the folder holding nnet/ and "
                      "vnnlib/ (see its README)")
    return path


def nnet_path(network: str) -> Path:
    return root() / "nnet" / f"ACASXU_run2a_{network}_batch_2000.nnet"


def negated(network: str) -> nn.Sequential:
    """The network (normalised in, normalised scores out) followed by y -> -y (a Linear layer)."""
    net = read_nnet(nnet_path(network)).module()
    flip = nn.Linear(5, 5, bias=False)
    flip.weight.data = -torch.eye(5)
    return nn.Sequential(*net, flip).eval()


def export(network: str = "1_1", out: Path | None = None) -> Path:
    out = Path(out or HERE / "artefacts" / f"acasxu_{network}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.jit.trace(negated(network), torch.zeros(1, 5)).save(str(out))
    return out


class Samples:
    """Uniform points of the normalised input box, labelled by the network's advisory."""

    def __init__(self, split: str, network: str = "1_1", size: int | None = None):
        if split not in SIZES:
            raise KeyError(f"unknown split {split!r}; known: {list(SIZES)}")
        nnet = read_nnet(nnet_path(network))
        lo = (nnet.input_min - nnet.input_mean) / nnet.input_range
        hi = (nnet.input_max - nnet.input_mean) / nnet.input_range
        rng = np.random.default_rng(SEEDS[split])
        self.x = (lo + (hi - lo) * rng.random((size or SIZES[split], 5))).astype(np.float32)
        with torch.no_grad():
            self.y = nnet.module()(torch.from_numpy(self.x)).argmin(1).numpy()
        self.key = f"{network}:{split}:{len(self.x)}:{hashlib.sha256(nnet_path(network).read_bytes()).hexdigest()}"

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Item:
        return Item(image=self.x[i].reshape(1, 5), label=int(self.y[i]), id=f"point-{i:05d}")

    def fingerprint(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()


def load_split(split: str, network: str = "1_1", size: int | None = None) -> Samples:
    return Samples(split, network, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network", default="1_1", help="x_y of N_{x,y}")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    print(export(a.network, a.out))


if __name__ == "__main__":
    main()
