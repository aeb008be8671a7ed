"""Train the solar-cell classifier, deterministically for a seed, in a few minutes on 2 CPU cores.

    python use_cases/solar_cells/train.py [--seed 0] [--epochs 30] [--noise-sigma 0.0] [--lipschitz]

The model is exported as TorchScript to the path the use case names. Training reads the training
split once into memory (about 6 MB at 64x64) because it loops over it for many epochs; the
assessment itself always streams.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cnn  # noqa: E402
import elpv  # noqa: E402

from trustcase.models.classifier import Classifier  # noqa: E402
from trustcase.schemas import load_use_case  # noqa: E402

USE_CASE = HERE / "use_case.yaml"


def read(split: str, size: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    s = elpv.load_split(split, size=size)
    items = [s[i] for i in range(min(len(s), limit or len(s)))]
    return np.stack([it.image[..., None] for it in items]), np.array([it.label for it in items])


def evaluate(clf: Classifier, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred = np.concatenate([clf.logits(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    recall = [float((pred[y == c] == c).mean()) for c in (0, 1)]
    return {"accuracy": float((pred == y).mean()), "recall_defective": recall[1],
            "balanced_accuracy": float(np.mean(recall))}


def train(out: Path | None = None, seed: int = 0, epochs: int = 30, noise_sigma: float = 0.0,
          lipschitz: bool = False, width: int = 16, log=print, use_case: Path = USE_CASE,
          limit: int | None = None) -> dict:
    """Train and export; returns the parameters and validation metrics (for the training log).

    `use_case` gives the input contract (size, normalisation); `limit` caps the items per split (tests).
    """
    spec = load_use_case(use_case).model
    out = Path(out or spec.path)
    size = spec.input_shape[-1]
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(seed)
    xtr, ytr = read("train", size, limit)
    xva, yva = read("validation", size, limit)
    model = cnn.build(width=width, lipschitz=lipschitz, size=size)
    clf = Classifier(spec, module=model)
    lo, hi = spec.value_range
    # class weights against the 2:1 imbalance: a missed defect is the costly error
    weights = torch.tensor(len(ytr) / (2 * np.bincount(ytr, minlength=2)), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * int(np.ceil(len(xtr) / 64)))
    best, best_state, history = -1.0, None, []
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(xtr))
        total = 0.0
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            xb = xtr[idx].astype(np.float32)
            # augmentation: flips (cells are symmetric), brightness gain, optional Gaussian noise
            if rng.random() < 0.5:
                xb = xb[:, :, ::-1]
            if rng.random() < 0.5:
                xb = xb[:, ::-1]
            xb = xb * rng.uniform(0.8, 1.2, size=(len(xb), 1, 1, 1)).astype(np.float32)
            if noise_sigma > 0:
                xb = xb + rng.normal(0, noise_sigma * (hi - lo), size=xb.shape).astype(np.float32)
            xb = np.clip(xb, lo, hi) if noise_sigma == 0 else xb
            x = clf.to_input(torch.from_numpy(np.ascontiguousarray(xb)))
            loss = loss_fn(model(x), torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        metrics = evaluate(clf, xva, yva)
        history.append({"epoch": epoch, "loss": total / len(xtr), **metrics})
        log(f"epoch {epoch + 1:2d}/{epochs} loss {total / len(xtr):.4f} val acc {metrics['accuracy']:.3f} "
            f"recall(defective) {metrics['recall_defective']:.3f}")
        if metrics["balanced_accuracy"] > best:
            best = metrics["balanced_accuracy"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    cnn.export(model, out, tuple(spec.input_shape))
    final = evaluate(clf, xva, yva)
    params = {"seed": seed, "epochs": epochs, "noise_sigma": noise_sigma, "lipschitz": lipschitz, "width": width,
              "train_items": len(xtr), "validation_items": len(xva), "splits": elpv.splits_id()}
    result = {"params": params, "validation": final, "history": history, "seconds": time.time() - t0,
              "path": str(out)}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def stale(path: Path) -> str | None:
    """Why the model file at `path` no longer fits its data (trained under another split rule), if it does not:
    a model whose training cells now sit in the test split would be assessed on what it has seen."""
    log = Path(path).with_suffix(".json")
    trained = json.loads(log.read_text()).get("params", {}).get("splits") if log.is_file() else None
    if trained != elpv.splits_id():
        return f"{Path(path).name} was trained under another split rule ({trained or 'unrecorded'})"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--noise-sigma", type=float, default=0.0, help="Gaussian augmentation, fraction of the range")
    ap.add_argument("--lipschitz", action="store_true", help="spectrally normalised, robust-by-design variant")
    a = ap.parse_args()
    r = train(a.out, a.seed, a.epochs, a.noise_sigma, a.lipschitz)
    print(json.dumps({"validation": r["validation"], "seconds": round(r["seconds"], 1), "path": r["path"]}))


if __name__ == "__main__":
    main()
