"""LoRA's EVA initialisation (Explained Variance Adaptation; peft's init_lora_weights="eva").

Each target layer's A starts as the top right-singular vectors of its inputs over calibration
batches (B = 0, so the model starts at its base): an incremental PCA takes one batch at a time
until, for every layer, the components its rank needs stop turning (cosine similarity with
the previous batch's ≥ τ). Then the rank budget Σr is shared out again: the layers whose
components explain most of their inputs' variance get up to ρ·r, others fewer (possibly none).
With `adjust`, α scales with the new rank so s = α/r is unchanged.

Same numbers as peft, step for step: its incremental PCA (sums in fp64, a randomized SVD
seeded with 42 for q = 2k components, signs fixed by each component's largest entry), its
sharing of one PCA between layers that see the same input (q, k, v), its rank distribution
(ties included) and its stopping rule. One change: peft cycles the data until convergence with
no limit; here `limit` batches are the most it takes, and a run that did not converge is
refused with what to change.
"""

import torch
import torch.nn.functional as F

from ..errors import UserError
from .calibration import run_hooked, take
from .targets import dims


class IncrementalPCA:
    """peft's incremental PCA (a port of scikit-learn's) with a seeded randomized SVD."""

    def __init__(self, k: int):
        self.k, self.components, self.singular = k, None, None
        self.mean = self.var = None
        self.seen = torch.tensor([0])

    def _mean_var(self, X):
        """Running mean and variance over all rows seen (fp64 sums), as peft updates them."""
        n = torch.tensor([X.shape[0]], device=X.device)
        total = self.seen + n
        last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if self.mean is None else self.mean * self.seen
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centered = X - new_sum / n
        correction = centered.sum(dim=0, dtype=torch.float64).square()
        new_var = centered.square().sum(dim=0, dtype=torch.float64) - correction / n
        if self.var is None:
            return mean, new_var / total, total
        ratio = self.seen.double() / n
        var = self.var * self.seen + new_var + ratio / total * (last_sum / ratio - new_sum).square()
        return mean, var / total, total

    def partial_fit(self, X: torch.Tensor) -> None:
        """X: (rows, n) fp32, one batch's inputs."""
        X = X.clone()
        mean, var, total = self._mean_var(X)
        if self.components is None:
            X -= mean
        else:  # the previous fit as k weighted rows, this batch centered, and the mean's shift
            batch_mean = X.mean(dim=0)
            X -= batch_mean
            shift = torch.sqrt((self.seen.double() / total) * X.shape[0]) * (self.mean - batch_mean)
            X = torch.vstack((self.singular.view(-1, 1) * self.components, X, shift))
        with torch.random.fork_rng(devices=[] if X.device.type == "cpu" else [X.device]):
            torch.manual_seed(42)
            _, S, V = torch.svd_lowrank(X, q=2 * self.k, niter=4)
        Vt = V.mH
        rows = torch.argmax(torch.abs(Vt), dim=1)  # peft's svd_flip(u_based_decision=False)
        Vt = Vt * torch.sign(Vt[range(Vt.shape[0]), rows]).view(-1, 1)
        self.ratio = (S**2 / torch.sum(var * total))[: self.k]  # explained variance ratio
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular = Vt[: self.k], S[: self.k]


def _ranks(pcas, shared, owner, budget, most):
    """peft's rank distribution: the `budget` largest explained-variance ratios over all layers
    (a layer sharing another's PCA competes with the same values), then each pair that shares a
    PCA gives the larger count to the layer that owns the PCA."""
    ratios = {p: pca.ratio[: most[p]] for p, pca in pcas.items()}
    keys, values = zip(*[(layer, c) for layer, p in owner.items() for c in ratios[p]])
    order = torch.stack(values).argsort(descending=True)
    counts = {layer: 0 for layer in owner}
    for i in order[:budget].tolist():
        counts[keys[i]] += 1
    for layer, p in shared.items():
        if counts[p] < counts[layer]:
            counts[p], counts[layer] = counts[layer], counts[p]
    return counts


@torch.no_grad()
def eva_init(model, plan: list, calibration, rho: float, tau: float, whiten: bool, limit: int) -> dict:
    """{path: A (k, n)} for each layer of `plan` ([(path, layer, r, α)]); k is the layer's new
    rank (0: no LoRA there). Reads at most `limit` calibration batches."""
    layers = {path: layer for path, layer, _, _ in plan}
    most = {path: round(r * rho) for path, _, r, _ in plan}
    budget = sum(r for _, _, r, _ in plan)
    for path, layer, r, _ in plan:
        n = dims(layer)[0]
        if 2 * most[path] > n:
            raise UserError(f"lora init=eva: r·eva_rho = {most[path]} components need 2×{most[path]} ≤ the {n} inputs "
                            f"of {path}; lower r or eva_rho")
    batches = take(calibration, limit, "lora init=eva")
    rows, taken = {}, {}  # taken: id(input tensor) -> (it, its kept rows), so q, k, v share one copy

    def flat(path, x, keep):  # (tokens kept, n), in peft's order (batch-major)
        if id(x) not in taken:
            taken[id(x)] = (x, x[keep].float())  # holding x keeps its id from being reused in this pass
        rows[path] = taken[id(x)][1]

    run_hooked(model, layers, batches[0], flat)
    taken.clear()
    groups = {}  # first layer seen with an input -> every layer with that same input (q, k, v)
    for p in layers:
        first = next((q for q in groups if rows[q] is rows[p] or torch.equal(rows[q], rows[p])), p)
        groups.setdefault(first, []).append(p)
    shared = {m: first for first, members in groups.items() for m in members[1:]}  # this layer -> the PCA's owner
    for members in groups.values():
        for m in members:
            most[m] = max(most[x] for x in members)
    pcas = {p: IncrementalPCA(most[p]) for p in layers if p not in shared}
    owner = {**{p: p for p in pcas}, **shared}
    converged = {p: torch.zeros(most[p], dtype=torch.bool) for p in pcas}
    counts, done = dict(most), {p: False for p in pcas}

    def fit(path, x, keep):
        X = x[keep].float()
        if path not in pcas or done[path] or X.shape[0] < pcas[path].k:  # peft skips batches with fewer rows than k
            return
        pca = pcas[path]
        before = None if pca.components is None else pca.components.clone()
        pca.partial_fit(X)
        if before is not None:
            converged[path] = (F.cosine_similarity(pca.components, before) >= tau).cpu()

    for used in range(limit + 1):  # the batches again and again, as peft cycles its data, `limit` passes at most
        for p in pcas:  # a layer stops fitting once its needed components hold (and resumes if the need grows)
            done[p] = bool(torch.all(converged[p][: counts[p]]))
        if all(done.values()):
            break
        if used == limit:
            left = sum(not d for d in done.values())
            raise UserError(f"lora init=eva: {left} of {len(done)} layers' components still moved after {limit} "
                            f"calibration batches; raise calibration_batches= (or lower eva_tau={tau})")
        run_hooked(model, {p: layers[p] for p in pcas if not done[p]}, batches[used % len(batches)], fit)
        if all(pca.components is not None for pca in pcas.values()):
            counts = _ranks(pcas, shared, owner, budget, most)
    found = {}
    for path in layers:
        pca = pcas[owner[path]]
        u = pca.components[: counts[path]].clone()
        if whiten:
            u = u / pca.singular[: counts[path]].sqrt().reshape(-1, 1)
        found[path] = u.float()
    return found
