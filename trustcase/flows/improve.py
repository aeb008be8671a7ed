"""`trustcase improve`: from the evidence to a better model version, and the proof that it got better.

    trustcase improve USE_CASE --method hudd|noise|adversarial|lipschitz [--budget N]

One Prefect flow:
1. the parent: the use case's model file, registered (idempotent by hash) and assessed if it never was;
2. what to train, by method:
   - `hudd` (Fahmy, Pastore, Briand): the root causes of the parent's errors on the test split (relevance
     clusters, `explain.root_causes`: misclassified items, images with a missed true box, missed defective
     images, as the task reads them), then the unsafe set from the pool (`training.pool`, default the
     root_causes check's `improvement_split`): items within a cluster's reach, an equal share of the budget
     per cluster, bootstrap copies to balance, labelled from the pool's own labels (a detector's or segmenter's
     by its own boxes or mask: `ExtraItem.label` None). Baseline: the same number of pool items drawn at random
     (seeded), as in the HUDD paper. The only method taught detectors and segmenters;
   - `noise`: Gaussian-noise augmentation at the smoothing sigma of the plan (randomized smoothing's
     training recipe); baseline: the same schedule without noise;
   - `adversarial`: PGD adversarial training at the largest L-inf amplitude an adversarial claim names;
     baseline: the same schedule without the attack;
   - `lipschitz`: the script's 1-Lipschitz architecture (`models.lipschitz_layers`) with Lipschitz-margin
     training at the largest L2 radius a lipschitz_certified_accuracy claim names; another architecture, so it
     trains from scratch (the parent's weights do not carry over), and so does its baseline: the script's
     default architecture, same epochs and seed, without the method;
   the versions are fine-tuned from the parent's weights (lipschitz: from scratch) with the same seed, through
   the use case's own training contract (`training.entry`, see `schemas.training`);
3. each new model is checked (finite weights, loads, fits the classes), registered with its parent, method
   and selection (ids, salted hashes for a confidential use case), and assessed with the same plan and seed
   through `watch.assess_version`: the `qualified` alias follows the watcher's rules (every mandatory claim
   PASS, no regression against the version holding it). A version whose assessment fails is deleted from
   the registry: never a registered version without its assessment;
4. the improvement report (`improvement.json`, `improvement.html`): per claim, parent vs improved vs
   baseline with intervals, regressions first; for `hudd`, the accuracy of each model on the held-out test
   items that fall within each root-cause cluster's reach (not the selected pool items): a detector's recall of
   their true boxes at the operating threshold (the task's interval: the wider of Clopper-Pearson over boxes and
   the bootstrap over images), a segmenter's share of their defective images found. The parent's figure there is
   biased low by selection (its own errors on those items formed the cluster), so the report compares the
   improved version with the baseline, and says so (`SELECTION`).
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task

from trustcase.checks import Context, build, check_class
from trustcase.data.streaming import DataSource
from trustcase.errors import Unsupported, UserError
from trustcase.explain import attribution as A
from trustcase.explain.root_causes import analyse, errors_of
from trustcase.flows import confidential, rerender, tracking, watch
from trustcase.flows.assess import preflight
from trustcase.flows.prefect_db import ensure_local_database
from trustcase.flows.preflight import import_paths
from trustcase.measurement import proportion
from trustcase.models.classifier import ModelError, sha256_file
from trustcase.registry import resolve
from trustcase.reports import improvement as report
from trustcase.schemas import (
    Assessment,
    CheckSpec,
    ExtraItem,
    Scope,
    TrainingRequest,
    TrainingResult,
    UseCase,
    compare_claims,
)
from trustcase.tasks import task_of

METHODS = ("hudd", "noise", "adversarial", "lipschitz")
ROLE_TAG = "trustcase.improve."


class ImproveError(UserError):
    """A user error: no training contract, a method the use case cannot support, a training that failed."""


# --- validated up front ---------------------------------------------------------------------------------

def training_entry(uc: UseCase, use_case_path: Path):
    """The use case's training function, imported with its folders on the path and checked against the
    contract's signature: one parameter (a TrainingRequest)."""
    if uc.training is None:
        raise ImproveError(f"{use_case_path}: no 'training' section: name the function that trains a version "
                           "(training: {entry: module:function}, see docs/architecture.md, the training contract)")
    import_paths(uc, use_case_path)
    fn = resolve(uc.training.entry, uc.data.path, "training.entry", ImproveError)
    if not callable(fn):
        raise ImproveError(f"training.entry {uc.training.entry!r} is not a function")
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) != 1:
        raise ImproveError(f"training.entry {uc.training.entry!r} must take one TrainingRequest, its signature is "
                           f"{fn.__name__}{inspect.signature(fn)}")
    hint = params[0].annotation
    if hint is not inspect.Parameter.empty and getattr(hint, "__name__", hint) not in ("TrainingRequest",):
        raise ImproveError(f"training.entry {uc.training.entry!r}: its parameter is annotated {hint!r}, "
                           "not TrainingRequest")
    return fn


def method_settings(uc: UseCase, method: str) -> dict:
    """What a method needs from the use case, or a clear error before any work."""
    if method not in METHODS:
        raise ImproveError(f"unknown method {method!r}; known: {list(METHODS)}")
    if uc.task != "classification" and method != "hudd":
        raise ImproveError(f"--method {method} is not taught a {uc.task} model: the training contract's noise, "
                           "adversarial and Lipschitz recipes are a classifier's (a detector's or segmenter's script "
                           "trains on its annotations only); --method hudd is")
    plan = {c.check: c.params for c in uc.plan.checks}
    lo, hi = uc.model.value_range
    if method in ("hudd", "adversarial") and uc.model.format in ("python", "challenge"):
        raise ImproveError(f"--method {method} needs the model's gradients; the model is a black box")
    if method == "hudd":
        pool = (uc.training.pool if uc.training else None) or plan.get("root_causes", {}).get("improvement_split")
        if pool is None:
            raise ImproveError("--method hudd needs a pool of items to select from: set training.pool (a data "
                               "role) or the root_causes check's improvement_split")
        if pool not in uc.data.splits:
            raise ImproveError(f"training.pool {pool!r} is not a data role ({list(uc.data.splits)})")
        if "test" not in uc.data.splits:
            raise ImproveError("--method hudd clusters the errors of the test split: data.splits has no 'test'")
        if DataSource(uc.data, uc.plan.seed, uc.model).tiling() is not None:  # known before the parent's assessment
            raise ImproveError(f"--method hudd under fit: tiles: {check_class('root_causes').not_tiled}")
        return {"pool": pool, "root_causes": plan.get("root_causes", {})}
    if method == "noise":
        sigma = (uc.training.params.get("noise_sigma") if uc.training else None) or \
            plan.get("randomized_smoothing", {}).get("sigma", None)
        if sigma is None:
            raise ImproveError("--method noise trains at the smoothing sigma: add the randomized_smoothing check "
                               "to the plan or set training.params.noise_sigma (a fraction of the value range)")
        return {"noise_sigma": float(sigma) * (hi - lo)}
    if method == "adversarial":
        eps = [r.scope.perturbation.max_amplitude for r in uc.requirements
               if r.scope.perturbation and r.scope.perturbation.name.endswith("_linf")]
        if not eps:
            raise ImproveError("--method adversarial trains at the claimed radius: no requirement names an L-inf "
                               "attack amplitude (e.g. scope.perturbation {name: pgd_linf, max_amplitude: 1})")
        return {"epsilon": float(max(eps))}
    radii = [r.scope.perturbation.max_amplitude for r in uc.requirements
             if r.metric == "lipschitz_certified_accuracy" and r.scope.perturbation]
    if not radii:
        raise ImproveError("--method lipschitz trains Lipschitz margins at the claimed radius: no requirement claims "
                           "lipschitz_certified_accuracy at an L2 radius (scope.perturbation {name: l2_radius, "
                           "max_amplitude: r}, r in the input scaled to [0, 1])")
    return {"l2_radius": float(max(radii)) * (hi - lo)}  # pixel units, as the training contract takes radii


# --- HUDD's selection ---------------------------------------------------------------------------------------

def _load(uc: UseCase, model_path: Path):
    """The model at `model_path` as the use case's task sees it (a `Detector`, a `Segmenter`, a classifier)."""
    return task_of(uc).load_model(uc.model.model_copy(update={"path": model_path}))


def _context(uc: UseCase, model_path: Path, seed: int, workdir: Path) -> Context:
    return Context(use_case=uc, model=_load(uc, model_path), data=DataSource(uc.data, seed, uc.model), seed=seed,
                   workdir=workdir)


@task(name="root causes and unsafe set", persist_result=False)
def select_unsafe(uc: UseCase, parent: Path, pool: str, rc_params: dict, budget: int, seed: int,
                  workdir: Path) -> dict:
    """The parent's error clusters on the test split, the HUDD unsafe set from the pool, the random baseline
    of the same size, and the held-out test items within each cluster's reach."""
    p = build(CheckSpec(check="root_causes", params={k: v for k, v in rc_params.items()
                                                     if k not in ("improvement_split", "unsafe_budget")})).params
    ctx = _context(uc, parent, seed, workdir)
    net = A.Network(ctx.model)
    try:
        a = analyse(ctx.model, net, ctx.batches("test", p.batch_size), p.layers, relevance=p.relevance,
                    max_features=p.max_features, max_errors=p.max_errors, k_max=p.k_max, k=p.k, seed=seed,
                    min_iou=p.min_iou)
    except Unsupported as e:
        raise ImproveError(f"--method hudd: {e}") from None
    if len(a.errors.ids) < 2:
        raise ImproveError(f"--method hudd: {len(a.errors.ids)} error(s) in the test split: no root cause to fix")
    # the pool: a classifier's items explained for their prediction (unlabeled in principle), a detector's and a
    # segmenter's for their true boxes / defect (their annotations are what the retraining learns)
    found = a.assign(ctx.batches(pool, p.batch_size))
    if not found.ids:
        raise ImproveError(f"--method hudd: the pool {pool!r} has no readable item")
    chosen, copies = found.select(a.k, budget, seed)
    if not len(chosen):
        raise ImproveError(f"--method hudd: no item of the pool {pool!r} lies within the reach of a root-cause "
                           "cluster; a larger or closer pool is needed")
    rng = np.random.default_rng(seed + 1)
    random = rng.choice(len(found.ids), size=min(int(copies.sum()), len(found.ids)), replace=False)
    # held-out: test items (all, not only errors) within a cluster's reach
    test = a.assign(ctx.batches("test", p.batch_size))

    def label(i):  # a detector's or segmenter's item is learnt with its own annotation
        return int(found.labels[i]) if a.reader.labelled_by_class else None

    return {
        "layer": a.layer, "k": int(a.k), "radii": a.radii.tolist(), "figure": a.reader.figure,
        "cluster_sizes": np.bincount(a.labels, minlength=a.k).tolist(),
        "improved": [ExtraItem(role=pool, index=int(found.index[i]), label=label(i), copies=int(c))
                     for i, c in zip(chosen, copies, strict=True)],
        "baseline": [ExtraItem(role=pool, index=int(found.index[i]), label=label(i)) for i in random],
        "improved_ids": [found.ids[i] for i in chosen], "baseline_ids": [found.ids[i] for i in random],
        "improved_clusters": found.cluster[chosen].tolist(),
        "heldout": {int(c): test.index[test.inside & (test.cluster == c)].tolist() for c in range(a.k)},
        "pool_within_reach": int(found.inside.sum()), "pool_items": len(found.ids),
    }


SELECTION = ("The parent's figure on a cluster is biased low by selection: its own errors on these test items formed "
             "the cluster, so another version, even one no better, tends to score higher there. The fair "
             "comparison is improved against the random baseline (same training, the same number of pool items "
             "drawn at random); a cluster counts as improved only where their intervals do not overlap.")


@task(name="cluster accuracy", persist_result=False)
def cluster_accuracy(uc: UseCase, models: dict[str, Path], heldout: dict[int, list[int]], confidence: float,
                     seed: int, min_iou: float = 0.0) -> dict[str, list[dict]]:
    """Each model's figure on the held-out test items of each cluster, with its interval (`_figure`): a
    classifier's accuracy, a detector's recall of their true boxes at the operating threshold (the task's interval), a
    segmenter's share of their defective images found (the root cause's error rule)."""
    want = {i: c for c, items in heldout.items() for i in items}
    out = {}
    for name, path in models.items():
        reader = errors_of(_load(uc, path), min_iou)
        rows: list[list[tuple[str, int, int]]] = [[] for _ in heldout]  # per cluster: (item id, right, total)
        for batch in DataSource(uc.data, seed, uc.model).stream("test").batches():
            if not any(int(i) in want for i in batch.index):
                continue
            ex = reader.read(batch, errors=False)
            for j, i in enumerate(batch.index.tolist()):
                if i in want:
                    rows[want[i]].append((batch.ids[j], int(ex.right[j]), int(ex.total[j])))
        out[name] = [_figure(reader.figure, c, r, confidence, seed).model_dump(mode="json") for c, r in enumerate(rows)]
    return out


def _figure(figure: str, cluster: int, rows: list[tuple[str, int, int]], confidence: float, seed: int):
    """One cluster's figure. An item counting once (a classifier's image, a segmenter's defective tile): Clopper-
    Pearson. A detector's image counting each of its boxes: the task's own recall rule, the wider of
    Clopper-Pearson over boxes and the Poisson bootstrap over images (boxes of one image are not independent)."""
    from trustcase.measurement import bootstrap_weights
    from trustcase.tasks.detection_metrics import box_recall

    ids = [r[0] for r in rows]
    right = np.array([r[1] for r in rows], np.float64)
    total = np.array([r[2] for r in rows], np.float64)
    metric, undefined = f"cluster_{figure}:{cluster}", "no held-out test item within the cluster's reach"
    if (total <= 1).all():
        return proportion("improve", metric, int(right.sum()), int(total.sum()), confidence, Scope(split="test"),
                          undefined=undefined)
    weights = bootstrap_weights(seed, "improve", ids).astype(np.float64)
    return box_recall("improve", metric, right, total, weights, confidence, Scope(split="test"), None, undefined)


# --- training and registration -----------------------------------------------------------------------------

@task(name="train", persist_result=False, task_run_name="train {role}")
def train(entry, request: TrainingRequest, role: str, uc: UseCase) -> Path:
    try:
        result = entry(request)
    except Exception as e:  # the use case's own code: its failure is the user's to read, named
        raise ImproveError(f"training.entry {uc.training.entry!r} failed for the {role} version: "
                           f"{type(e).__name__}: {e}") from None
    if not isinstance(result, TrainingResult):
        result = TrainingResult.model_validate(result)
    path = Path(result.model)
    if not path.is_file():
        raise ImproveError(f"training.entry {uc.training.entry!r} returned {path}, which does not exist")
    try:
        clf = _load(uc, path)
    except ModelError as e:
        raise ImproveError(f"the {role} model does not load or fit the use case: {e}") from None
    module = clf.module
    if module is not None and not all(torch.isfinite(t).all() for t in module.state_dict().values()):
        raise ImproveError(f"the {role} model has NaN or infinite weights: training diverged; nothing registered")
    (path.parent / f"{path.stem}.training.json").write_text(json.dumps(result.log, indent=1, default=str))
    return path


def _ids(uc: UseCase, ids: list[str]) -> list[str]:
    if not uc.confidential:
        return ids
    salt = confidential.salt(tracking.HOME)  # the site's secret: the public use-case id would let anyone test ids
    return [confidential.hash_id(i, salt) for i in ids]


def _assessed(client: MlflowClient, uc: UseCase, version: str, out_root: Path, alias: str) -> Assessment:
    """The version's assessment: its own if it has one, else assessed now (watcher's rules for the alias)."""
    name = tracking.registered_name(uc)
    mv = client.get_model_version(name, version)
    run_id = mv.tags.get(watch.TAG + "run_id")
    if run_id is None:
        run_id = watch.assess_version(client, uc, mv, out_root, alias).run_id
    return rerender.fetch_assessment(run_id)


@flow(name="trustcase-improve")
def improve(use_case_path: str, method: str, budget: int = 100, out_root: str = "trustcase-out",
            tracking_uri: str | None = None, seed: int | None = None, alias: str = watch.ALIAS,
            epochs: int | None = None) -> dict:
    log = get_run_logger()
    path = Path(use_case_path).resolve()
    uc = preflight(path, seed)  # every user error of the use case before any training
    entry = training_entry(uc, path)
    settings = method_settings(uc, method)
    seed = uc.plan.seed if seed is None else seed
    if budget < 1:
        raise ImproveError(f"--budget must be >= 1, got {budget}")
    if epochs is not None and epochs < 1:  # before the parent is assessed: nothing to train is known now
        raise ImproveError(f"--epochs must be >= 1, got {epochs}")
    tracking.configure(tracking_uri)
    client = MlflowClient()
    parent_path = Path(uc.model.path)
    parent = tracking.register_model(uc, parent_path, sha256_file(parent_path), {"params": {"origin": "use case"}})
    out = Path(out_root).resolve() / f"{uc.id}-improve-{method}-from-v{parent}"
    out.mkdir(parents=True, exist_ok=True)
    log.info(f"improve: parent version {parent}, method {method}, output {out}")
    seconds, t0 = {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t0
        seconds[stage] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()

    before = _assessed(client, uc, parent, Path(out_root).resolve(), alias)
    lap("parent assessment")

    base = dict(use_case=path, seed=seed, init=parent_path, epochs=epochs, params=uc.training.params)
    selection: dict = {}
    if method == "hudd":
        selection = select_unsafe(uc, parent_path, settings["pool"], settings["root_causes"], budget, seed,
                                  out / "root_causes")
        requests = {"improved": TrainingRequest(out=out / "improved.pt", extra=selection["improved"], **base),
                    "baseline": TrainingRequest(out=out / "baseline.pt", extra=selection["baseline"], **base)}
        lap("root causes and selection")
    elif method == "noise":
        requests = {"improved": TrainingRequest(out=out / "improved.pt", augment="noise",
                                                noise_sigma=settings["noise_sigma"], **base),
                    "baseline": TrainingRequest(out=out / "baseline.pt", **base)}
    elif method == "adversarial":
        requests = {"improved": TrainingRequest(out=out / "improved.pt", augment="adversarial",
                                                epsilon=settings["epsilon"], **base),
                    "baseline": TrainingRequest(out=out / "baseline.pt", **base)}
    else:  # lipschitz: another architecture, so both versions train from scratch (no weights carry over)
        scratch = {**base, "init": None}
        requests = {"improved": TrainingRequest(out=out / "improved.pt", augment="lipschitz",
                                                l2_radius=settings["l2_radius"], **scratch),
                    "baseline": TrainingRequest(out=out / "baseline.pt", **scratch)}
    models = {role: train(entry, req, role, uc) for role, req in requests.items()}
    lap("training (improved + baseline)")

    versions, after = {}, {}
    name = tracking.registered_name(uc)
    for role, model in models.items():
        training = json.loads((model.parent / f"{model.stem}.training.json").read_text())
        v = tracking.register_model(uc, model, sha256_file(model), training)
        tags = {"parent": parent, "method": method, "role": role, "seed": str(seed),
                "init": "parent weights" if requests[role].init else "from scratch"}
        if method == "hudd":
            ids = _ids(uc, selection[f"{role}_ids"])
            tags["selection"] = ",".join(ids)[:4900]
            tags["selection_size"] = str(sum(e.copies for e in selection[role]))
        for k_, v_ in tags.items():
            client.set_model_version_tag(name, v, ROLE_TAG + k_, v_)
        try:
            after[role] = _assessed(client, uc, v, Path(out_root).resolve(), alias)
        except BaseException:
            client.delete_model_version(name, v)  # never a registered version without its assessment
            raise
        versions[role] = v
    lap("registration and assessments")

    clusters = None
    if method == "hudd":
        acc = cluster_accuracy(uc, {"parent": parent_path, **models}, selection["heldout"],
                               uc.plan.confidence, seed, settings["root_causes"].get("min_iou", 0.0))
        clusters = {"layer": selection["layer"], "k": selection["k"], "sizes": selection["cluster_sizes"],
                    "figure": selection["figure"], "comparison": SELECTION,
                    "heldout": {str(c): len(v) for c, v in selection["heldout"].items()}, "accuracy": acc,
                    "pool_within_reach": selection["pool_within_reach"], "pool_items": selection["pool_items"],
                    "selected": sum(e.copies for e in selection["improved"]),
                    "selected_clusters": np.bincount(  # copies per cluster: an equal share each
                        selection["improved_clusters"], weights=[e.copies for e in selection["improved"]],
                        minlength=selection["k"]).astype(int).tolist(),
                    "distinct_per_cluster": np.bincount(selection["improved_clusters"],
                                                        minlength=selection["k"]).tolist()}
        lap("held-out cluster accuracy")
    summary = {
        "use_case": uc.id, "method": method, "settings": {k: v for k, v in settings.items() if k != "root_causes"},
        "budget": budget, "seed": seed, "parent": parent,
        "versions": versions, "qualified": _alias_holder(client, name, alias),
        "claims": claims_table(before, after["improved"], after["baseline"]),
        "clusters": clusters,
        "seconds": seconds,
        "runs": {"parent": before.provenance.mlflow_run_id,
                 **{r: a.provenance.mlflow_run_id for r, a in after.items()}},
    }
    (out / "improvement.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "improvement.html").write_text(report.render(summary), encoding="utf-8")
    with mlflow.start_run(experiment_id=tracking.experiment(uc), run_name=f"improve-{method}") as run:
        mlflow.set_tags({"kind": "improvement", "method": method, "parent_version": parent,
                         **{f"{r}_version": v for r, v in versions.items()}})
        mlflow.log_artifact(str(out / "improvement.json"))
        mlflow.log_artifact(str(out / "improvement.html"))
        summary["run_id"] = run.info.run_id
    summary["report"] = str(out / "improvement.html")
    return summary


def _alias_holder(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # no alias yet
        return None


def claims_table(parent: Assessment, improved: Assessment, baseline: Assessment) -> list[dict]:
    """Per claim: the three versions' values, intervals and verdicts; what the improved version changed
    against the parent (schemas.compare_claims), regressions first."""
    rows = {r.claim_id: r for r in compare_claims(improved.evidence, parent.evidence)}
    by = {name: {e.claim_id: e for e in a.evidence} for name, a in
          (("parent", parent), ("improved", improved), ("baseline", baseline))}
    out = []
    for req in improved.requirements:
        row = {"claim": req.id, "text": req.text, "mandatory": req.mandatory}
        for name, ev in by.items():
            e = ev.get(req.id)
            row[name] = None if e is None else {
                "verdict": e.verdict.value, "value": e.value,
                "interval": None if e.interval is None else [e.interval.lower, e.interval.upper]}
        change = rows.get(req.id)
        row["regression"] = bool(change and change.regression)
        row["improvement"] = bool(change and change.status == "improvement")
        row["worse"] = bool(change and change.worse)
        out.append(row)
    return sorted(out, key=lambda r: (not r["regression"], not r["worse"], not r["improvement"], r["claim"]))


def run(use_case_path: str, method: str, budget: int, out_root: str, tracking_uri: str | None,
        seed: int | None = None, epochs: int | None = None) -> dict:
    ensure_local_database()
    return improve(use_case_path, method, budget, out_root, tracking_uri, seed, epochs=epochs)
