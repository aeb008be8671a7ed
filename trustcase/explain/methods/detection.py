"""Explanations of one detected box, and their quality.

- **D-RISE** (Petsiuk et al. 2021, "Black-box explanation of object detectors via saliency maps"): the image under
  random smooth masks (RISE's, `RiseMethod.masks`: a low-resolution grid of kept cells, upsampled and shifted),
  each masked image's detections compared with the explained box by the similarity of the paper, max over
  detections of IoU(box, d) x class similarity x score(d); a detector of this contract returns a class index, not a
  probability vector, so the class similarity is 1 for the same class and 0 otherwise. The map is the similarity's
  mean over the masks that keep a pixel (Xplique's normalisation by the masks' sum) minus its mean over all masks:
  positive where keeping the pixel raises the box's similarity, a flat map where nothing matters. Forward passes
  only: it explains black boxes. The same masks for every item (seeded by the call's seed), so an item's map does
  not depend on its batch.
- **Grad-CAM of a box** (Selvaraju et al. 2017, on a detector's box): the gradient of the box's class score (the best
  score of the detections of its class overlapping it at IoU >= 0.5) with respect to a convolutional layer's
  activations, averaged per channel, weighs the channels; ReLU, bilinear upsampling to the input. Default layer: the
  last convolution (in execution order) the score depends on whose map is not empty. Layers are hooked on an eager
  model and tapped from the graph of a TorchScript one.

Quality of a map for its box: deletion / insertion of pixels, most relevant first, following the box score (the
D-RISE similarity; AUC, Petsiuk et al. 2018), against a random ordering; and the energy of the map inside the box
(the share of its positive mass there, Wang et al. 2020's energy-based pointing game), whose chance level is the
box's share of the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trustcase.errors import Unsupported
from trustcase.explain import ExplainError
from trustcase.explain.methods.perturbation import RiseMethod
from trustcase.explain.network import Network
from trustcase.explain.quality import _order
from trustcase.models import anatomy
from trustcase.tasks.detection_metrics import iou as iou_np

IOU = 0.5


def box_iou(rows: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU of detection rows (N, D, >= 4) with one box per item (N, 4): (N, D)."""
    w = (torch.minimum(rows[..., 2], box[:, None, 2]) - torch.maximum(rows[..., 0], box[:, None, 0])).clamp_min(0)
    h = (torch.minimum(rows[..., 3], box[:, None, 3]) - torch.maximum(rows[..., 1], box[:, None, 1])).clamp_min(0)
    inter = w * h
    area = (rows[..., 2] - rows[..., 0]) * (rows[..., 3] - rows[..., 1])
    union = area + ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))[:, None] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def similarity(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D-RISE's similarity of each item's detections (N, D, 6) to its explained box (N, 5: x1 y1 x2 y2 class): the max
    over detections of IoU x [same class] x score (padding rows, score < 0, count 0). (N,)"""
    same = (rows[..., 5] == target[:, None, 4]).to(rows.dtype)
    return (box_iou(rows, target[:, :4]) * same * rows[..., 4].clamp_min(0)).amax(dim=1)


def class_score(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The box's class score: the best score of the detections of its class overlapping it at IoU >= 0.5 (the
    selection carries no gradient), 0 when there is none. (N,)"""
    with torch.no_grad():
        mine = (rows[..., 5] == target[:, None, 4]) & (box_iou(rows, target[:, :4]) >= IOU) & (rows[..., 4] >= 0)
    return torch.where(mine, rows[..., 4], torch.zeros_like(rows[..., 4])).amax(dim=1)


def d_rise(forward, x: torch.Tensor, targets: torch.Tensor, baseline: float | torch.Tensor = 0.0, masks: int = 1000,
           cells: int = 16, keep: float = 0.5, seed: int = 0, chunk: int = 32) -> np.ndarray:
    """D-RISE maps (B, H, W) of each item's box `targets` (B, 5) for normalised inputs x (B, C, H, W); `forward` maps
    inputs to detections (N, D, 6)."""
    b, c, h, w = x.shape
    rise = RiseMethod(None, RiseMethod.Options(masks=masks, cells=cells, keep=keep))
    gen = torch.Generator().manual_seed(int(seed))
    kept = torch.zeros(b, h, w, dtype=torch.float64)
    total = torch.zeros(h, w, dtype=torch.float64)
    mean = torch.zeros(b, dtype=torch.float64)
    base = torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    with torch.no_grad():
        for start in range(0, masks, chunk):
            m = rise.masks(min(chunk, masks - start), h, w, gen)  # (n, H, W)
            total += m.sum(0).double()
            for i in range(b):
                inputs = x[i][None] * m[:, None] + base[i][None] * (1 - m[:, None])
                s = similarity(forward(inputs), targets[i][None].expand(len(m), 5)).double()
                kept[i] += torch.einsum("n,nhw->hw", s, m.double())
                mean[i] += s.sum()
    return (kept / total.clamp_min(1e-12) - (mean / masks)[:, None, None]).float().numpy()


def box_grad_cam(net: Network, x: torch.Tensor, targets: torch.Tensor, layer: str | None = None) -> tuple[np.ndarray,
                                                                                                       str]:
    """Grad-CAM maps (B, H, W) of each item's box class score, and the layer used (named, else the last convolution
    in execution order whose activations the score depends on and whose map is not empty: a CenterNet's heat head
    gives relu of its logits, negative everywhere below a score of 1/2). Layers are hooked on an eager model; a
    TorchScript model that cannot be hooked has its convolutions tapped from its graph (`anatomy.convolution_taps`),
    named conv1, conv2, ... in execution order."""
    if not net.differentiable:
        raise Unsupported("grad_cam needs the detector's internals; the model is a black box (use d_rise)")
    names, acts, score = activations(net, x, targets, layer)
    grads = torch.autograd.grad(score.sum(), acts, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and bool(g.abs().sum() > 0)]
    if not live:
        raise Unsupported(f"grad_cam: the box score depends on none of the layers {names} (no gradient reaches them)")
    for i in live[::-1]:  # the last layer whose map is not empty (a head's logits may be negative everywhere)
        cam = F.relu((grads[i].mean(dim=(2, 3), keepdim=True) * acts[i]).sum(dim=1, keepdim=True)).detach()
        if cam.sum() > 0 or i == live[0]:
            break
    return F.interpolate(cam, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)[:, 0].numpy(), names[i]


def activations(net: Network, x: torch.Tensor, targets: torch.Tensor, layer: str | None, score=None):
    """(layer names, their activations, the scores) from one forward pass with gradients; `score(output, targets)`
    per item, default the box class score (root causes explain other scores of a detector or a segmenter)."""
    score = score or class_score
    z = x.detach().clone().requires_grad_(True)
    layers = net.layers()
    if not layers and isinstance(net.module, torch.jit.ScriptModule):
        run = anatomy.convolution_taps(net.module)
        if run is None:
            raise Unsupported("grad_cam: the TorchScript detector has no convolution to tap")
        with torch.enable_grad():
            out, acts = run(z)
        names = [f"conv{i + 1}" for i in range(len(acts))]
        if layer is not None:
            if layer not in names:
                raise ExplainError(f"layer {layer!r} does not exist; the TorchScript detector's convolutions in "
                                   f"execution order: {', '.join(names)}")
            acts, names = [acts[names.index(layer)]], [layer]
        with torch.enable_grad():
            return names, acts, score(out, targets)
    if not layers:
        raise Unsupported(f"grad_cam needs hookable layers: {net.note or 'none found'} (d_rise needs none)")
    names = [net.layer(layer)[0]] if layer is not None else net.conv_layers()
    if not names:
        raise Unsupported(f"grad_cam: the detector has no Conv2d layer; name one of {net.describe()}")
    seen: dict[str, torch.Tensor] = {}
    handles = [layers[n].register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o)) for n in names]
    try:
        with torch.enable_grad():
            scores = score(net.forward(z), targets)
    finally:
        for h in handles:
            h.remove()
    return list(seen), list(seen.values()), scores  # in execution order: hooks fire as the layers run


METHODS = ("d_rise", "grad_cam")


def box_masks(targets: np.ndarray, h: int, w: int) -> np.ndarray:
    """(B, H, W) bool: the pixels whose centre lies in each item's box."""
    cy, cx = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    return np.stack([(cx >= t[0]) & (cx <= t[2]) & (cy >= t[1]) & (cy <= t[3]) for t in targets])


def energy_in_box(heat: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per item the share of the map's positive mass inside its box (NaN for a map with none)."""
    pos = np.clip(heat, 0, None).astype(np.float64)
    inside = (pos * box_masks(targets, *heat.shape[1:])).sum(axis=(1, 2))
    total = pos.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def box_deletion_insertion(forward, x: torch.Tensor, targets: torch.Tensor, heat: np.ndarray,
                           baseline: float | torch.Tensor, steps: int = 20, seed: int = 0) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """The box score (D-RISE similarity) as the most relevant pixels are deleted (replaced by the baseline) /
    inserted (into the baseline): two (B, steps + 1) arrays; ties in the map broken at random, per item."""
    b, c, h, w = x.shape
    ranks = torch.from_numpy(_order(heat, seed))
    counts = torch.round(torch.linspace(0, h * w, steps + 1)).long()
    base = torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    dele, ins = np.zeros((b, steps + 1)), np.zeros((b, steps + 1))
    with torch.no_grad():
        for i in range(b):
            gone = (ranks[i][None] < counts[:, None]).to(x.dtype).view(steps + 1, 1, h, w)
            both = torch.cat([x[i] * (1 - gone) + base[i] * gone, base[i] * (1 - gone) + x[i] * gone])
            s = similarity(forward(both), targets[i][None].expand(len(both), 5)).numpy()
            dele[i], ins[i] = s[:steps + 1], s[steps + 1:]
    return dele, ins


def explained_box(dets: np.ndarray, gts: np.ndarray, threshold: float) -> np.ndarray | None:
    """The box an image's explanation is about: its best-scoring indication (score >= threshold) that overlaps a true
    box of its class at IoU >= 0.5, else its best-scoring indication, else None. (5,): x1 y1 x2 y2 class."""
    above = dets[dets[:, 4] >= threshold]
    above = above[np.argsort(-above[:, 4], kind="mergesort")]
    if not len(above):
        return None
    for d in above:
        same = gts[gts[:, 4] == d[5]]
        if len(same) and (iou_np(d[None, :4], same[:, :4]) >= IOU).any():
            return np.r_[d[:4], d[5]]
    return np.r_[above[0, :4], above[0, 5]]
