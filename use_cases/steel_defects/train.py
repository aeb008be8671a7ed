"""Train the bundled steel-defect detector: a small anchor-free CenterNet (Zhou et al. 2019, "Objects as points")
on the NEU-DET train split, from scratch on CPU (no pretrained weights exist offline), deterministic for its seed
(one thread, deterministic algorithms, fixed epochs, seeded order and augmentation), exported as TorchScript with
the detection contract of `trustcase.tasks.detection`: (B, D, 6) rows (x1, y1, x2, y2, score, class), D = 100
peaks.

    python use_cases/steel_defects/train.py      # artefacts/steel_detector.pt (+ .json log), prints test mAP@0.5

The training log beside the model records its recipe (seed, epochs, batch, learning rate, width, threads, the split
rule's id and the training items); `stale(path)` names what differs from this script's default recipe, and
`trustcase demo steel_defects` trains such a model again.

The network sees the 200x200 grey image at half resolution; its heads (class heat maps, box size, centre offset)
are at stride 4 of the image (50x50). Boxes decode from the peaks of the heat maps (3x3 max-pool suppression).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from neu import CLASSES, SPLITS, dataset_root, load_split, split_stems  # noqa: E402

DEFAULT_EPOCHS = 24  # the default recipe's (`trustcase demo steel_defects` trains it)
# The default recipe: the bundled model's figures (README, architecture) are this recipe's. One thread: a sum over
# another number of threads runs in another order, and float32 sums differ in their last bits.
RECIPE = {"seed": 0, "epochs": DEFAULT_EPOCHS, "batch": 16, "lr": 2e-3, "width": 16, "split_seed": 0, "threads": 1}
DEFAULT_OUT = HERE / "artefacts" / "steel_detector.pt"  # where use_case.yaml expects the model
STRIDE = 4  # heads at 50x50 for a 200x200 image
SIZE = 200
MEAN, STD = 0.5, 0.2  # the use case's normalisation (pixels / 255)


def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CenterNet(nn.Module):
    def __init__(self, n_classes: int = len(CLASSES), width: int = 16, detections: int = 100):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.AvgPool2d(2), block(1, w), block(w, 2 * w, 2), block(2 * w, 2 * w))  # 50x50
        self.down = nn.Sequential(block(2 * w, 4 * w, 2), block(4 * w, 4 * w))  # 25x25
        self.deep = nn.Sequential(block(4 * w, 4 * w, 2), block(4 * w, 4 * w))  # 13x13: context of crazing-wide boxes
        self.fuse = nn.Sequential(nn.Conv2d(10 * w, 3 * w, 1, bias=False), nn.BatchNorm2d(3 * w), nn.ReLU(inplace=True))
        self.heat = nn.Conv2d(3 * w, n_classes, 1)
        self.box = nn.Conv2d(3 * w, 4, 1)  # log(width / stride), log(height / stride), offset x, offset y
        nn.init.constant_(self.heat.bias, -2.19)  # sigmoid = 0.1: CenterNet's prior
        self.detections = detections
        self.stride = STRIDE

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused map at stride 4 and the deepest map."""
        a = self.stem(x)
        b = self.down(a)
        c = self.deep(b)
        size = a.shape[-2:]
        f = torch.cat([a, F.interpolate(b, size=size, mode="nearest"), F.interpolate(c, size=size, mode="nearest")], 1)
        return self.fuse(f), c

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, _ = self.maps(x)
        return self.heat(f), self.box(f)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features for trustcase's ODD monitor (B, 112): the fused and the deepest maps, each
        averaged over the image."""
        f, c = self.maps(x)
        return torch.cat([f.mean(dim=(2, 3)), c.mean(dim=(2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heat, box = self.heads(x)
        heat = torch.sigmoid(heat)
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat).to(heat.dtype)
        b, c, h, w = peaks.shape
        scores, index = peaks.reshape(b, -1).topk(self.detections)
        cls = torch.div(index, h * w, rounding_mode="floor")
        pixel = index - cls * h * w
        ys = torch.div(pixel, w, rounding_mode="floor").to(heat.dtype)
        xs = (pixel - torch.div(pixel, w, rounding_mode="floor") * w).to(heat.dtype)
        reg = box.reshape(b, 4, h * w).gather(2, pixel.unsqueeze(1).expand(b, 4, self.detections))
        bw = torch.exp(reg[:, 0].clamp(max=4.0)) * self.stride
        bh = torch.exp(reg[:, 1].clamp(max=4.0)) * self.stride
        cx = (xs + 0.5 + reg[:, 2]) * self.stride
        cy = (ys + 0.5 + reg[:, 3]) * self.stride
        side = float(h * self.stride)
        x1 = (cx - bw / 2).clamp(0.0, side)
        y1 = (cy - bh / 2).clamp(0.0, side)
        x2 = torch.maximum((cx + bw / 2).clamp(0.0, side), x1)
        y2 = torch.maximum((cy + bh / 2).clamp(0.0, side), y1)
        return torch.stack([x1, y1, x2, y2, scores, cls.to(heat.dtype)], dim=-1)


def targets(boxes: np.ndarray, n_classes: int, cells: int = SIZE // STRIDE):
    """CenterNet's targets of one image: Gaussian heat maps (sigma a sixth of the box in each direction, TTFNet's
    ellipse), and at each box centre its log size and offset."""
    heat = np.zeros((n_classes, cells, cells), np.float32)
    reg = np.zeros((4, cells, cells), np.float32)
    mask = np.zeros((cells, cells), np.float32)
    yy, xx = np.mgrid[0:cells, 0:cells].astype(np.float32)
    for x1, y1, x2, y2, c in sorted(boxes.tolist(), key=lambda r: -(r[2] - r[0]) * (r[3] - r[1])):  # small on top
        cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
        w, h = (x2 - x1) / STRIDE, (y2 - y1) / STRIDE
        ix, iy = min(int(cx), cells - 1), min(int(cy), cells - 1)
        sx, sy = max(w / 6, 0.8), max(h / 6, 0.8)
        g = np.exp(-((xx - ix) ** 2) / (2 * sx * sx) - ((yy - iy) ** 2) / (2 * sy * sy))
        heat[int(c)] = np.maximum(heat[int(c)], g)
        reg[:, iy, ix] = (np.log(w), np.log(h), cx - ix - 0.5, cy - iy - 0.5)
        mask[iy, ix] = 1.0
    return heat, reg, mask


def focal(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the heat maps (alpha 2, beta 4), per box."""
    p = torch.sigmoid(pred).clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(1).float()
    loss = -(pos * (1 - p) ** 2 * torch.log(p) + (1 - pos) * (1 - gt) ** 4 * p ** 2 * torch.log(1 - p))
    return loss.sum() / pos.sum().clamp(min=1)


def read(split: str, seed: int, limit: int | None = None):
    """A split's images, true boxes and file names; `limit`: that many items spread evenly over the split (whose
    items go class by class), for short trainings."""
    data = load_split(split, seed)
    chosen = range(len(data)) if limit is None else np.linspace(0, len(data) - 1, limit).round().astype(int).tolist()
    images, boxes = [], []
    for i in chosen:
        item = data[i]
        images.append(item.image)
        boxes.append(np.asarray(item.label.rows, np.float64))
    return np.stack(images), boxes, [data.name(i) for i in chosen]


def normalise(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).float()[:, None] / 255.0 - MEAN) / STD


def augment(x, h, r, m, rng: np.random.Generator):
    """Per image: horizontal and vertical flips (a strip defect has no left or right, and the camera sees the strip
    run either way) and a lighting shift of up to 10% of the grey range (the ODD's brightness moves with the line's
    lighting). Flipping the grid changes the sign of the centre offset along the flipped axis."""
    n = len(x)
    for axis, off in ((-1, 2), (-2, 3)):
        f = torch.from_numpy(rng.uniform(size=n) < 0.5)
        fx = f.view(n, 1, 1, 1)
        x, h, r, m = (torch.where(fx, x.flip(axis), x), torch.where(fx, h.flip(axis), h),
                      torch.where(fx, r.flip(axis), r), torch.where(f.view(n, 1, 1), m.flip(axis), m))
        sign = torch.ones(n, 4, 1, 1)
        sign[f, off] = -1.0
        r = r * sign
    shift = torch.from_numpy(rng.uniform(-0.1, 0.1, size=n)).float().view(n, 1, 1, 1) / STD
    return (x + shift).clamp(-MEAN / STD, (1 - MEAN) / STD), h, r, m  # a pixel saturates at 0 and 255


def missing_data() -> str | None:
    """Why the images cannot be read, if they cannot (`trustcase demo steel_defects` says it before any work)."""
    root = dataset_root()
    return None if (root / "images").is_dir() else (f"NEU-DET not found at {root} (set TRUSTCASE_NEUDET to the "
                                                    "folder holding images/ and annotations/)")


def splits_id(seed: int) -> str:
    """The split rule's fingerprint: a hash of every split's image stems (a model trained under another rule, or on
    another copy of NEU-DET, may have seen the test images)."""
    stems = {split: split_stems(split, seed) for split in SPLITS}
    return hashlib.sha256(json.dumps(stems, sort_keys=True).encode()).hexdigest()[:16]


def recipe() -> dict:
    """The default recipe as the training log records it."""
    seed = RECIPE["split_seed"]
    return {**RECIPE, "splits": splits_id(seed), "train_items": len(split_stems("train", seed))}


def stale(path: Path) -> str | None:
    """Why the model file must be trained again: no training log beside it (its recipe unknown), or a log whose
    recipe is not this script's default (another seed, epochs, width, threads, split rule or training items)."""
    log = Path(path).with_suffix(".json")
    if not log.is_file():
        return f"{Path(path).name} has no training log beside it (its recipe is unrecorded)"
    params = json.loads(log.read_text()).get("params", {})
    if moved := [f"{k} {params.get(k, 'unrecorded')} -> {v}" for k, v in recipe().items() if params.get(k) != v]:
        return f"{Path(path).name} was trained by another recipe ({', '.join(moved)})"
    return None


def fit(images: np.ndarray, boxes: list[np.ndarray], seed: int = RECIPE["seed"], epochs: int = DEFAULT_EPOCHS,
        batch: int = RECIPE["batch"], lr: float = RECIPE["lr"], width: int = RECIPE["width"],
        log=print, init: Path | None = None) -> tuple[CenterNet, list[dict]]:
    """The training loop: the network trained on `images` with their true `boxes`, and its loss per epoch. Its
    weights are a function of the arguments alone: the seed fixes the initial weights (torch), the order of the
    batches and the augmentation (numpy); one thread and deterministic algorithms fix the arithmetic. Torch's
    thread count and determinism flag are restored after. `init`: fine-tuned from that exported model's weights."""
    from trustcase.seeding import torch_threads

    with torch_threads(RECIPE["threads"], deterministic=True):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        t0, cpu0 = time.perf_counter(), time.process_time()
        packed = [targets(b, len(CLASSES)) for b in boxes]
        heat = torch.from_numpy(np.stack([p[0] for p in packed]))
        reg = torch.from_numpy(np.stack([p[1] for p in packed]))
        mask = torch.from_numpy(np.stack([p[2] for p in packed]))
        x_all = normalise(images)
        model = CenterNet(width=width)
        if init is not None:
            model.load_state_dict(torch.jit.load(str(init)).state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(images) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        history = []
        for epoch in range(epochs):
            model.train()
            order = rng.permutation(len(images))
            total = 0.0
            for s in range(0, len(order), batch):
                idx = torch.from_numpy(order[s:s + batch])
                x, h, r, m = augment(x_all[idx], heat[idx], reg[idx], mask[idx], rng)
                pred_heat, pred_box = model.heads(x)
                n_boxes = m.sum().clamp(min=1)
                size = (F.l1_loss(pred_box[:, :2], r[:, :2], reduction="none").sum(1) * m).sum() / n_boxes
                offset = (F.l1_loss(pred_box[:, 2:], r[:, 2:], reduction="none").sum(1) * m).sum() / n_boxes
                loss = focal(pred_heat, h) + 0.5 * size + offset
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            history.append({"epoch": epoch, "loss": total / len(images)})
            log(f"epoch {epoch + 1}/{epochs} loss {total / len(images):.3f} ({time.perf_counter() - t0:.0f} s, "
                f"{time.process_time() - cpu0:.0f} s CPU)")
        return model.eval(), history


def train(out: Path = DEFAULT_OUT, seed: int = RECIPE["seed"], epochs: int = DEFAULT_EPOCHS,
          batch: int = RECIPE["batch"], lr: float = RECIPE["lr"], split_seed: int = RECIPE["split_seed"],
          width: int = RECIPE["width"], limit: int | None = None, log=print) -> dict:
    """Train on the train split (`limit`: that many of its items, for short trainings), export to `out` with its
    training log beside (`out.json`: the recipe, validation figures, loss per epoch), and return the log with the
    test figures."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    images, boxes, _ = read("train", split_seed, limit)
    model, history = fit(images, boxes, seed, epochs, batch, lr, width, log)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(out))
    exported = torch.jit.load(str(out))
    result = {"params": {"seed": seed, "epochs": epochs, "batch": batch, "lr": lr, "width": width,
                         "split_seed": split_seed, "splits": splits_id(split_seed), "train_items": len(images),
                         "threads": RECIPE["threads"]},
              "validation": {k: v for k, v in evaluate(exported, split_seed, "validation").items()
                             if not isinstance(v, list)},
              "history": history, "train_seconds": train_s, "train_cpu_seconds": train_cpu, "path": str(out)}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return {**result, "model": str(out), **evaluate(exported, split_seed)}


def retrain(request):
    """The training contract (`training.entry: train:retrain`, `trustcase improve`): the train split plus the
    request's extra items (each with its own true boxes, `copies` times: HUDD's unsafe set), fine-tuned from
    `request.init` (the parent's weights and width; `finetune_epochs`, default 4, at `finetune_lr`, default 5e-4)
    or trained from scratch by the default recipe. Annotations only: no noise, adversarial or Lipschitz recipe."""
    from trustcase.schemas import TrainingResult, load_use_case

    if request.augment != "none" or request.roles != ["train"] or request.held_out:
        raise ValueError(f"this script trains on the train split and extra items, without augmentation "
                         f"{request.augment!r}, other roles {request.roles} or held-out folds")
    uc, p = load_use_case(request.use_case), dict(request.params)
    split_seed = int(uc.data.params.get("seed", RECIPE["split_seed"]))
    images, boxes, _ = read("train", split_seed, p.get("limit"))
    extra_images, extra_boxes = [], []
    for e in request.extra:
        item = load_split(uc.data.splits[e.role], split_seed)[e.index]
        extra_images += [item.image] * e.copies
        extra_boxes += [np.asarray(item.label.rows, np.float64)] * e.copies
    if extra_images:
        images, boxes = np.concatenate([images, np.stack(extra_images)]), boxes + extra_boxes
    tuned = request.init is not None
    width = torch.jit.load(str(request.init)).state_dict()["stem.1.0.weight"].shape[0] if tuned else RECIPE["width"]
    epochs = request.epochs or (int(p.get("finetune_epochs", 4)) if tuned else DEFAULT_EPOCHS)
    lr = float(p.get("finetune_lr", 5e-4)) if tuned else RECIPE["lr"]
    t0 = time.process_time()
    model, history = fit(images, boxes, request.seed, epochs, RECIPE["batch"], lr, width, lambda line: None,
                         init=request.init)
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(out))
    log = {"params": {"seed": request.seed, "epochs": epochs, "lr": lr, "width": width, "split_seed": split_seed,
                      "init": None if request.init is None else str(request.init), "train_items": len(images),
                      "extra_items": len(request.extra), "extra_copies": len(extra_images),
                      "threads": RECIPE["threads"]},
           "history": history, "train_cpu_seconds": time.process_time() - t0, "path": str(out)}
    out.with_suffix(".json").write_text(json.dumps(log, indent=1))
    return TrainingResult(model=out, log=log)


def evaluate(model, split_seed: int = 0, split: str = "test", threshold: float = 0.3) -> dict:
    """mAP@0.5 (and the rest) of the exported model on a split, with its bootstrap interval."""
    from trustcase.tasks.detection_metrics import DetectionTally

    images, boxes, names = read(split, split_seed)
    tally = DetectionTally(CLASSES, threshold, "performance", seed=0)
    with torch.inference_mode():
        for s in range(0, len(images), 32):
            out = model(normalise(images[s:s + 32])).double().numpy()
            dets = [rows[rows[:, 4] >= 0] for rows in out]
            tally.update(dets, boxes[s:s + 32], names[s:s + 32])
    ms = {m.metric: m for m in tally.compute(split, 0.95, 1000)}
    m = ms["map50"]
    return {"map50": m.value, "map50_interval": [m.interval.lower, m.interval.upper],
            "map": ms["map"].value, "indication_recall": ms["indication_recall"].value,
            "false_indications_per_image": ms["false_indications_per_image"].value}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    result = train(a.out, a.seed, a.epochs, log=lambda line: print(line, flush=True))
    print({k: v for k, v in result.items() if k != "history"})
