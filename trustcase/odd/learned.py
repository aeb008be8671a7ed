"""The learned monitor: class-conditional Gaussian (Mahalanobis, streamed fit, shrunk covariance) and energy
scores on the model's features and logits, standardised and thresholded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trustcase.odd.specification import MonitorError, State

SCORES = ("mahalanobis", "energy")


class GaussianFit:
    """Class means and one shared within-class covariance, updated batch by batch (Chan et al.'s pairwise
    update): memory O(K d + d^2), whatever the number of items."""

    def __init__(self, n_classes: int, dim: int):
        self.counts = np.zeros(n_classes, np.int64)
        self.means = np.zeros((n_classes, dim))
        self.scatter = np.zeros((dim, dim))

    def update(self, features: np.ndarray, labels: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.scatter.shape[0]:
            raise ValueError(f"features must be (B, {self.scatter.shape[0]}), got {f.shape}")
        for k in np.unique(labels):
            x = f[labels == k]
            nb, mb = len(x), x.mean(axis=0)
            xc = x - mb
            n, delta = self.counts[k], mb - self.means[k]
            total = n + nb
            self.scatter += xc.T @ xc + np.outer(delta, delta) * (n * nb / total)
            self.means[k] += delta * (nb / total)
            self.counts[k] = total

    def covariance(self, shrinkage: float | str = "oas") -> tuple[np.ndarray, float]:
        """The regularised shared covariance and the shrinkage used (Chen et al. 2010's OAS by default)."""
        classes = int((self.counts > 0).sum())
        dof = int(self.counts.sum()) - classes
        if dof < 1:
            raise ValueError(f"need more items than classes to fit a covariance (got {int(self.counts.sum())})")
        s = self.scatter / dof
        d = s.shape[0]
        mu = float(np.trace(s)) / d
        if mu <= 0:
            raise ValueError("the features are constant over the fit data: no covariance to fit")
        if shrinkage == "oas":
            alpha = float((s ** 2).mean())
            den = (dof + 1) * (alpha - mu ** 2 / d)
            rho = 1.0 if den <= 0 else min((alpha + mu ** 2) / den, 1.0)
        else:
            rho = float(shrinkage)
        return (1 - rho) * s + rho * mu * np.eye(d), rho


class Mahalanobis:
    """min_k (f - m_k)^T S^-1 (f - m_k) for S = V diag(l) V^T. With every direction (rank None) it is exact
    (d^2 operations per input); with `rank` r < d, the r leading directions are kept exactly and the others
    share their mean variance (probabilistic PCA): d r operations, so the monitor stays cheap beside the model."""

    def __init__(self, means: np.ndarray, basis: np.ndarray, inv_residual: float):
        self.means = np.asarray(means, dtype=np.float64)  # (K, d)
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)  # (d, r)
        self.inv_residual = float(inv_residual)  # 0 when exact
        # the scores run on torch's thread pool, the one the model already uses: numpy's BLAS would bring a
        # second pool whose spinning threads slow the model's next forward pass (measured: 2x at batch 64)
        self._basis = torch.from_numpy(self.basis)
        self._c = (self._basis.new_tensor(self.means.astype(np.float32)) @ self._basis).double()  # projected
        self._c_sq = (self._c ** 2).sum(dim=1)
        self._means = torch.from_numpy(self.means)
        self._m_sq = (self._means ** 2).sum(dim=1)

    @classmethod
    def fit(cls, means: np.ndarray, cov: np.ndarray, rank: int | None = None) -> Mahalanobis:
        vals, vecs = np.linalg.eigh(cov)  # ascending
        vals = np.maximum(vals, vals.max() * 1e-12)
        if rank is None or rank >= len(vals):
            return cls(means, vecs / np.sqrt(vals), 0.0)
        inv_res = 1.0 / vals[:-rank].mean()
        top, v = vals[-rank:], vecs[:, -rank:]
        # S^-1 = inv_res (I - V V^T) + V diag(1/l) V^T = inv_res I - V diag(inv_res - 1/l) V^T
        return cls(means, v * np.sqrt(np.maximum(inv_res - 1.0 / top, 0.0)), inv_res)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def __call__(self, features: np.ndarray) -> np.ndarray:
        f = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if f.ndim != 2 or f.shape[1] != self.basis.shape[0]:
            raise MonitorError(f"features of shape {tuple(f.shape)} do not fit the fitted dimension "
                               f"{self.basis.shape[0]}")
        with torch.inference_mode():
            z = (f @ self._basis).double()
            proj = (z ** 2).sum(dim=1, keepdim=True) - 2 * z @ self._c.T + self._c_sq
            if self.inv_residual:
                f64 = f.double()
                full = (f64 ** 2).sum(dim=1, keepdim=True) - 2 * f64 @ self._means.T + self._m_sq
                d = self.inv_residual * full - proj
            else:
                d = proj
            return d.min(dim=1).values.clamp_min(0.0).numpy()


class LearnedMonitor:
    """Scores on the model's features and logits, standardised and calibrated at declared false-alarm rates."""

    def __init__(self, scores: Sequence[str], mahalanobis: Mahalanobis | None, centre: dict[str, float],
                 scale: dict[str, float], near: float, out: float, info: dict | None = None):
        unknown = set(scores) - set(SCORES)
        if unknown or not scores:
            raise MonitorError(f"unknown learned scores {sorted(unknown)}; known: {list(SCORES)}")
        if "mahalanobis" in scores and mahalanobis is None:
            raise MonitorError("the mahalanobis score needs a fitted class-conditional Gaussian")
        self.scores, self.mahalanobis = list(scores), mahalanobis
        self.centre, self.scale, self.near, self.out = centre, scale, near, out
        self.info = info or {}

    def raw(self, features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        if "mahalanobis" in self.scores:
            out["mahalanobis"] = self.mahalanobis(features)
        if "energy" in self.scores:
            lg = np.asarray(logits, dtype=np.float64)
            m = lg.max(axis=1)
            out["energy"] = -(m + np.log(np.exp(lg - m[:, None]).sum(axis=1)))
        return out

    def standardise(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (v - self.centre[k]) / self.scale[k] for k, v in raw.items()}

    def statistic(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        return np.max(np.stack(list(self.standardise(raw).values())), axis=0)

    def judge(self, stat: np.ndarray) -> np.ndarray:
        s = np.where(stat > self.near, State.NEAR, State.IN).astype(np.int8)
        s[(stat > self.out) | ~np.isfinite(stat)] = State.OUT
        return s

    def threshold_of(self, score: str, level: str) -> float:
        """The raw value of one score at the NEAR or OUT threshold (for the reasons)."""
        return self.centre[score] + self.scale[score] * (self.near if level == "near" else self.out)

    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.mahalanobis is None:
            return {}
        return {"means": self.mahalanobis.means, "basis": self.mahalanobis.basis}

    def to_dict(self) -> dict:
        inv = None if self.mahalanobis is None else self.mahalanobis.inv_residual
        return {"scores": self.scores, "centre": self.centre, "scale": self.scale, "near": self.near,
                "out": self.out, "inv_residual": inv, "info": self.info}

    @classmethod
    def from_parts(cls, d: dict, arrays: dict[str, np.ndarray]) -> LearnedMonitor:
        maha = None
        if "mahalanobis" in d["scores"]:
            try:
                maha = Mahalanobis(arrays["means"], arrays["basis"], d["inv_residual"])
            except KeyError as e:
                raise MonitorError(f"monitor file lacks the array {e}") from None
        return cls(d["scores"], maha, d["centre"], d["scale"], d["near"], d["out"], d.get("info"))

