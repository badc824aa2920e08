"""OFT (orthogonal finetuning) on linear layers, as HF peft ≥ 0.18 computes it (peft_type "OFT").

A block-diagonal rotation acts on the layer's *input*; the frozen layer runs on the rotated input:

    x (..., n) as k blocks x_i of size b:  x_i ← x_i R_i  (row vector),  y = W x̃ + b = W M x + b,
    M = diag(R_1ᵀ, ..., R_kᵀ) (n, n)
    Q_i = skew(θ_i) (b, b): θ_i holds its b(b−1)/2 upper-triangle entries row by row, Q = U − Uᵀ
    R_i = (I − Q_i)(I + Q_i)⁻¹                      Cayley (exactly orthogonal)
    R_i = I + 2Q + 2Q² + ... + 2Q^{t−2} + Q^{t−1}    Cayley–Neumann with t terms (peft's loop: t = 3
                                                     and t = 4 both give I + 2Q + 2Q² + Q³)

n = k·b; `block_size` b (k = n/b per layer) or `r` = k (b = n/k) — exactly one, as in peft.
Init θ = 0 → R = I → the model is unchanged. `block_share`: one θ for all k blocks.
`coft` (constrained OFT): before each use, each block's ‖Q_i‖_F is clipped to eps/√(rows of θ)
in place, without gradient (peft's projection, so saved tensors match too).

Merge is multiplicative: W ← W M, i.e. column block i: W_i ← W_i R_iᵀ (peft: W ← (R_bd Wᵀ)ᵀ);
unmerge solves X R_iᵀ = W_i (under Cayley–Neumann R_i is only nearly orthogonal, so the inverse,
not the transpose). delta_weight = W M − W, for tracking.

Trainable per target: (1 if block_share else n/b) · b(b−1)/2; tensor `oft_R.weight` (k or 1, b(b−1)/2).

Where the rotation runs: a forward *pre* hook rewrites the host's input x → Mx and the host's own
forward does the rest. That costs no extra GEMM (both output-hook forms, base_out + W(Mx − x) and
F.linear(Mx, W, b), pay one), is bit-for-bit peft's order of operations (rotate, then the base
layer), works on any host forward (quantized bases too), and composes several active OFT adapters
on one layer in order, as peft does (an output hook sees only the unrotated x).

GPT-2's Conv1D layers are refused: peft's OFT has no Conv1D form, so such an adapter could not
be saved in peft's format. peft's `module_dropout` is accepted on read and dropped: peft 0.21
builds its dropout layer but never calls it.
"""

import re

import torch
import torch.nn as nn

from ..components import is_conv1d
from ..errors import UserError
from ..spec import Option, Step
from .attach import apply, attach
from .protocol import Added
from .registry import PeftCodec, peft_fields, register
from .targets import REGEX_HELP, TARGETS_HELP, base_weight, dims, peft_targets, pick_targets, target_options, write_weight

PEFT_VERSION = "0.21.2"  # the peft whose Cayley–Neumann form (changed in 0.18.0) this file matches


class OftRotation(Added):
    """The block-diagonal rotation of one layer's input: θ (k or 1, b(b−1)/2)."""

    slot = "oft"
    peft_keys = {"weight": "oft_R.weight"}
    label = "OFT"

    def __init__(self, d_in: int, block_size: int, block_share: bool = False, coft: bool = False, eps: float = 6e-5,
                 neumann: bool = True, terms: int = 5):
        super().__init__()
        b = block_size
        self.blocks = d_in // b  # k
        self.block_size = b
        self.block_share, self.coft, self.eps, self.neumann, self.terms = block_share, coft, eps, neumann, terms
        self.weight = nn.Parameter(torch.zeros(1 if block_share else self.blocks, b * (b - 1) // 2))
        rows, cols = torch.triu_indices(b, b, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, theta: torch.Tensor) -> torch.Tensor:
        """θ (k, b(b−1)/2) -> Q (k, b, b), Qᵀ = −Q."""
        q = torch.zeros(theta.shape[0], self.block_size, self.block_size, device=theta.device, dtype=theta.dtype)
        q[:, self.rows, self.cols] = theta
        return q - q.transpose(-2, -1)

    @torch.no_grad()
    def project(self) -> None:
        """COFT: clip each block's ‖Q_i‖_F to eps/√(rows of θ), in place (peft's `_project_batch`)."""
        q = self.skew(self.weight)
        eps = self.eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
        norm = torch.norm(q, dim=(1, 2), keepdim=True)  # (k, 1, 1)
        q = torch.where(norm <= eps, q, eps * (q / norm))
        self.weight.copy_(q[:, self.rows, self.cols])

    def rotation(self) -> torch.Tensor:
        """R (k, b, b) in θ's dtype, one block per input block (repeated when shared)."""
        if self.coft:
            self.project()
        q = self.skew(self.weight)
        n, b = q.shape[0], self.block_size
        if self.neumann:  # peft's loop, term for term (in-place adds on a fresh tensor)
            r = torch.eye(b, device=q.device, dtype=q.dtype).repeat(n, 1, 1)
            if self.terms > 1:
                r.add_(q, alpha=2.0)
                if self.terms > 2:
                    power = torch.bmm(q, q)
                    r.add_(power, alpha=2.0)
                    for _ in range(3, self.terms - 1):
                        power = torch.bmm(power, q)
                        r.add_(power, alpha=2.0)
                    r.add_(torch.bmm(power, q))
        else:  # X (I + Q) = I − Q
            eye = torch.eye(b, device=q.device).unsqueeze(0).expand(n, b, b)
            r = torch.linalg.solve(eye + q, eye - q, left=False)
        r = r.to(self.weight.dtype)
        return r.repeat(self.blocks, 1, 1) if self.block_share else r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., n) -> (..., k, b); block i: x_i R_i (row vector times R_i); back to (..., n)
        dtype = x.dtype
        x = x.to(self.weight.dtype)
        blocks = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", blocks, self.rotation()).reshape(x.shape).to(dtype)

    def rotated(self, w: torch.Tensor) -> torch.Tensor:
        """W (out, n) -> W M: column block i becomes W_i R_iᵀ, (out, n) fp32."""
        r = self.rotation().float()
        w = w.float().reshape(w.shape[0], self.blocks, self.block_size)
        return torch.einsum("ork,rck->orc", w, r).reshape(w.shape[0], -1)

    def delta_weight(self, layer: nn.Module) -> torch.Tensor:
        w = base_weight(layer).float()
        return self.rotated(w) - w

    def merge(self, layer: nn.Module) -> None:
        write_weight(layer, self.rotated(base_weight(layer)))

    def unmerge(self, layer: nn.Module) -> None:
        # W_i R_iᵀ = merged_i  =>  W_i = solve(X R_iᵀ = merged_i); (k, out, b) per block
        w = base_weight(layer).float()
        out = w.shape[0]
        merged = w.reshape(out, self.blocks, self.block_size).permute(1, 0, 2)
        x = torch.linalg.solve(self.rotation().float().transpose(-2, -1), merged, left=False)
        write_weight(layer, x.permute(1, 0, 2).reshape(out, -1))


def oft_hook(host, args, kwargs):
    """Rotate the host's input by every active OFT rotation (per row when routed)."""
    x = apply(getattr(host, OftRotation.slot), args[0], lambda child, rows, x: child(x))
    return (x, *args[1:]), kwargs


def block_size_of(path: str, d_in: int, r, block_size) -> int:
    if block_size is not None:
        if d_in % block_size:
            raise UserError(f"oft: block_size={block_size} does not divide {path}'s {d_in} input features; "
                            f"choose a divisor such as {', '.join(str(d) for d in (4, 8, 16, 32, 64) if d_in % d == 0) or d_in}")
        return block_size
    if d_in % r:
        raise UserError(f"oft: r={r} blocks do not divide {path}'s {d_in} input features; choose a divisor of {d_in}")
    return d_in // r


def add_oft(model, r, block_size, targets, target_regex, layers, coft, eps, block_share, use_cayley_neumann,
            num_cayley_neumann_terms, name, seed):
    """Attach OFT rotations named `name` to the chosen linear layers."""
    if r is not None and block_size is not None:
        raise UserError(f"oft: give r (blocks per layer) or block_size, not both (r={r}, block_size={block_size})")
    if r is None and block_size is None:
        block_size = 32
    chosen = pick_targets(model, targets, target_regex, layers, "oft")
    for path, layer in chosen.items():
        if is_conv1d(layer):
            raise UserError(f"oft: {path} is a GPT-2 Conv1D layer, which peft's OFT does not support; "
                            "peftlab refuses it so OFT adapters always load in peft")
    # r (blocks) and block_size must divide each target's input features, so neither can exceed
    # them: checked for every target before anything is allocated.
    sizes = {path: block_size_of(path, dims(layer)[0], r, block_size) for path, layer in chosen.items()}
    for path, layer in chosen.items():  # θ = 0 (R = I): nothing random; `seed` is the common interface
        d_in, _ = dims(layer)
        rot = OftRotation(d_in, sizes[path], block_share, coft, eps, use_cayley_neumann, num_cayley_neumann_terms)
        attach(layer, name, rot.to(layer.weight.device), oft_hook, pre=True)


# ---- peft's OFTConfig -------------------------------------------------------------------

def to_peft(model, step: Step, hosts: dict) -> dict:
    o = step.options
    first = next(iter(hosts.values()))
    return {
        "peft_type": "OFT", "peft_version": PEFT_VERSION, "r": o.get("r") or 0,
        "oft_block_size": 0 if o.get("r") else o.get("block_size") or 32,
        **peft_targets(model, hosts), "exclude_modules": None,
        "module_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "init_weights": True,
        "coft": first.coft, "eps": first.eps, "block_share": first.block_share,
        "use_cayley_neumann": first.neumann, "num_cayley_neumann_terms": first.terms,
    }


def _older(version: str, than: str) -> bool:
    def nums(v):
        return tuple(int(p) for p in re.findall(r"\d+", v.partition("@")[0])[:3])

    return nums(version) < nums(than)


def from_peft(config: dict, where) -> Step:
    """The `oft` step equivalent to a peft OFTConfig."""
    if "oft_block_size" not in config:
        raise UserError(f"{where}: an OFT adapter from peft < 0.14 (no oft_block_size); its layout is no longer peft's")
    version = config.get("peft_version")
    if config.get("use_cayley_neumann") and version and _older(str(version), "0.18.0"):
        raise UserError(f"{where}: written by peft {version}, whose Cayley–Neumann form changed in 0.18.0; retrain it")
    for key, default in (("bias", "none"), ("exclude_modules", None), ("fan_in_fan_out", False)):
        if config.get(key, default) not in (default, None, [], "none", False):
            raise UserError(f"{where}: peft option {key}={config[key]!r} is not supported by peftlab's OFT")
    r, size = config.get("r") or 0, config.get("oft_block_size") or 0
    if bool(r) == bool(size):
        raise UserError(f"{where}: OFT needs exactly one of r ({r}) and oft_block_size ({size}) non-zero")
    options = {"r": r} if r else {"block_size": size}
    options |= {"coft": bool(config.get("coft", False)), "eps": float(config.get("eps", 6e-5)),
                "block_share": bool(config.get("block_share", False)),
                "use_cayley_neumann": bool(config.get("use_cayley_neumann", True)),
                "num_cayley_neumann_terms": int(config.get("num_cayley_neumann_terms", 5))}
    options.update(target_options(config, where))
    return Step("oft", options)


@register(
    "oft", examples=("oft:block_size=8",), exempt={"gpt2": "no form for GPT-2's Conv1D layers (peft's OFT has none)"},
    peft=PeftCodec("OFT", to_peft, from_peft, fields=peft_fields(
        "r oft_block_size module_dropout fan_in_fan_out bias exclude_modules init_weights layers_to_transform",
        "layers_pattern modules_to_save coft eps block_share use_cayley_neumann num_cayley_neumann_terms target_modules")),
    r=Option(None, "int", help="blocks per layer (give r or block_size)", low=1),
    block_size=Option(None, "int", help="block size (default 32 when r is not given)", low=2),
    targets=Option(None, "list", help=TARGETS_HELP),
    target_regex=Option(None, "regex", help=REGEX_HELP),
    layers=Option(None, help="blocks: A-B, or indices joined with +"),
    coft=Option(False, "bool", help="constrained OFT: clip each rotation's size to eps"),
    eps=Option(6e-5, "float", help="COFT's bound", low=0),
    block_share=Option(False, "bool", help="one rotation shared by all blocks of a layer"),
    use_cayley_neumann=Option(True, "bool", help="Cayley–Neumann series instead of the exact Cayley inverse"),
    num_cayley_neumann_terms=Option(5, "int", low=1),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)
def oft(model, **opts):
    """Block-diagonal orthogonal rotation of each chosen layer's input (peft's OFT)."""
    add_oft(model, **opts)
