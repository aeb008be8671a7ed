"""`make planted`: the ten bugs of issue 19, planted one at a time in a scratch copy of the repository (never
in the working tree); each must make the test written for it fail, and the clean copy must pass them all.

    .venv/bin/python scripts/planted_bugs.py [number ...]
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent)
MUT = os.environ.get("TRUSTCASE_PLANTED_DIR", "/tmp/trustcase-planted")
BUGS = [
 ("1 max pooling 1-Lipschitz", "trustcase/certification/graph.py",
  "        return math.sqrt(pool_coverage(kh, sh, dh) * pool_coverage(kw, sw, dw))", "        return 1.0",
  "tests/test_exact_certification.py::test_max_pooling_constant_is_exact"),
 ("2 infidelity inputs/attributions swapped", "trustcase/explain/quality.py",
  "infidelity(net.forward, perturb, x, as_input_shape(maps, x),",
  "infidelity(net.forward, perturb, as_input_shape(maps, x), x,",
  "tests/test_exact_explain.py::test_infidelity_of_the_gradient_of_a_linear_model_is_zero"),
 ("3 SmoothGrad noise x10", "trustcase/explain/methods/gradient.py",
  "stdevs=o.noise_level * self.net.input_range, target", "stdevs=10 * o.noise_level * self.net.input_range, target",
  "tests/test_exact_explain.py::test_smoothgrad_is_the_average_gradient_at_the_documented_noise"),
 ("4 Grad-CAM always class 0", "trustcase/explain/methods/cam.py",
  "cam = gc.attribute(x, target=target, relu_attributions",
  "cam = gc.attribute(x, target=target * 0, relu_attributions",
  "tests/test_exact_explain.py::test_grad_cam_equals_cam_on_a_global_average_pooling_network"),
 ("5 monitor AUROC inverted", "trustcase/odd/validation.py",
  "auroc = float((below + 0.5 * ties).sum() / (len(neg) * len(pos)))",
  "auroc = 1 - float((below + 0.5 * ties).sum() / (len(neg) * len(pos)))",
  "tests/test_exact_metrics.py::test_roc_of_separable_scores"),
 ("6 drift one-sided", "trustcase/data/quality.py",
  "ks = stats.ks_2samp(ref, v)", 'ks = stats.ks_2samp(ref, v, alternative="less")',
  "tests/test_exact_metrics.py::test_drift_is_detected_darker_and_brighter"),
 ("7 occlusion patch half side", "trustcase/explain/methods/perturbation.py",
  "sliding_window_shapes=(c, o.window, o.window)",
  "sliding_window_shapes=(c, max(1, o.window // 2), max(1, o.window // 2))",
  "tests/test_exact_explain.py::test_occlusion_patch_is_the_documented_side"),
 ("8 knee one cluster too many", "trustcase/explain/root_causes.py",
  "return int(kl.knee) if kl.knee is not None else 1", "return int(kl.knee) + 1 if kl.knee is not None else 1",
  "tests/test_exact_explain.py::test_knee_finds_exactly_the_planted_clusters"),
 ("9 90% Wilson labelled 95%", "trustcase/measurement.py",
  "z = float(stats.norm.ppf(1 - (1 - confidence) / 2))", "z = float(stats.norm.ppf(1 - (1 - 0.90) / 2))",
  "tests/test_exact_certification.py::test_intervals_match_newcombe_table"),
 ("10 ECE unweighted mean of bins", "trustcase/performance.py",
  "ece = float((self.bin_count[nz] / total * gap).sum())", "ece = float(gap.mean())",
  "tests/test_exact_metrics.py::test_ece_weights_bins_by_their_counts"),
]
shutil.rmtree(MUT, ignore_errors=True)
shutil.copytree(SRC, MUT, symlinks=True, ignore=shutil.ignore_patterns(".venv", ".git", "mlruns", "*.db", "__pycache__",
                                                                       "node_modules", "build", "mutants"))
env = {**os.environ, "PYTHONPATH": MUT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
only = sys.argv[1:]
missed = 0
for name, path, old, new, test in BUGS:
    if only and name.split()[0] not in only:
        continue
    f = os.path.join(MUT, path)
    clean = open(f).read()
    assert clean.count(old) == 1, (name, clean.count(old))
    open(f, "w").write(clean.replace(old, new))
    r = subprocess.run([f"{SRC}/.venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                       cwd=MUT, env=env, capture_output=True, text=True)
    open(f, "w").write(clean)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    missed += r.returncode != 1
    verdict = "CAUGHT" if r.returncode == 1 else f"MISSED rc={r.returncode}"
    print(f"{name:<42} {verdict}  {test.split('::')[1]}: {last}", flush=True)
# sanity: the clean copy passes every one of these tests
r = subprocess.run([f"{SRC}/.venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    *sorted({b[4] for b in BUGS})], cwd=MUT, env=env, capture_output=True, text=True)
print("clean copy:", r.stdout.strip().splitlines()[-1])
sys.exit(1 if missed or r.returncode else 0)
