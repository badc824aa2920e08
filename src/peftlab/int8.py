"""The frozen base in int8 (`--base-precision int8`): frozen linear weights stored as int8 with
one scale per output channel, multiplied in int8 with a dynamic scale per token.

    W (out, in)  ≈  Wq · diag(sw)           Wq int8, sw (out,) = max|W[o, :]| / 127
    x (M, in)    ≈  diag(sx) · xq           xq int8, sx (M,)  = max|x[m, :]| / 127   (per call)

    forward   y  = x · Wᵀ   ≈ diag(sx) · (xq · Wqᵀ) · diag(sw)           int8 × int8 → int32
    backward  dx = dy · W   = (dy · diag(sw)) · Wq                         contracts over `out`

The input gradient contracts over the output channels, the axis that carries W's scales, so
they cannot be pulled out after the product: they are folded into dy first, and the scaled
gradient g = dy · diag(sw) is quantized per token like x (g ≈ diag(sg) · gq, dx ≈ diag(sg) ·
(gq · Wq)). No weight gradient is needed (the base is frozen), so neither x nor anything
float is kept for backward: only the int8 weight the layer already holds.

Trainable parameters, their gradients, norms, attention and the loss keep their own precision.

Outlier channels (as LLM.int8() does, but fixed once): a few input channels of some layers carry
values tens of times larger than the rest, and one scale per token would spend int8's range on
them. Before quantizing, the frozen layers see the first CALIBRATION_TOKENS of the training
data once (`input_ranges`); each layer keeps the weight columns of its OUTLIERS widest input channels
in fp32 and multiplies those channels there, the rest in int8:

    y  = xq · Wqᵀ (int8, outlier channels zeroed in both)  +  x[:, o] · W[:, o]ᵀ (fp32, (M, k) · (k, out))
    dx = the int8 product as above (zero in columns o)     and  dx[:, o] = dy · W[:, o]

Neither pass loses precision to the outliers, and nothing else changes (SmoothQuant's
alternative, moving the range into the weight, made dx 6× less precise in a test).
Measured on SmolLM2-135M (held-out loss before training, fp32): float 4.2761, int8 without
outlier channels 4.3088 (+0.77%), with 8 a layer 4.2830 (+0.16%; 2 a layer: +0.22%); int8
weights alone (float activations) 4.2800 (+0.09%).

Two kernels, same numbers: `torch._int_mm` where the device multiplies int8 natively (CUDA;
CPUs with AVX-512 VNNI or AMX); elsewhere (AVX2-only x86: `_int_mm` runs ~40× slower than
fp32 there) an fp32 GEMM of the same integer-valued operands, exact up to fp32 rounding of
the int32 sums. There the int8 base saves memory, not time (no faster int8 kernel exists
there either: fbgemm's AVX2 GEMM is measured in bench/README.md).

A layer becomes int8 in place (`to_int8`): the module object keeps its identity, so the
modules and hooks a strategy attached to it stay. Its `weight` reads back dequantized (fp32),
which is what DoRA's norm, tracking and merging need.
"""

import os

import torch
import torch.nn as nn

from . import memory
from .compat import int_mm
from .errors import UserError

KERNELS = ("int_mm", "float")
OUTLIERS = 8  # input channels a layer multiplies in fp32 (of 576 or 1536 in SmolLM2); 0.05–0.2% more GEMM work
CALIBRATION_TOKENS = 2048  # of training data the frozen layers see before quantizing (~3 s on 2 cores for SmolLM2)


def choose(requested: str, model: nn.Module, device: torch.device, dtype: torch.dtype, fsdp: bool = False,
           copies: int = 1) -> tuple[str, str | None]:
    """What `--base-precision auto` means here: (float | int8, the note saying why int8, or None).

    Speed never asks for int8: on no device measured did the int8 base train faster than the
    compiled bf16 one (AMX Xeon, SmolLM2 LoRA: 387 against 488 tokens/s, since the quantizing
    passes cost more than the int8 products save; AVX2: emulated products). Memory can: auto
    stores the base in int8 when its frozen layers in `dtype` would take more than half of the
    memory still available, where halving them decides whether the run fits. FSDP shards
    parameters, not the int8 layers' buffers, so it keeps float. `copies`: processes holding
    their own base in this memory. An explicit float or int8 is the user's word and passes through."""
    if requested != "auto":
        return requested, None
    layers = _frozen_linear(model)
    size = torch.empty((), dtype=dtype).element_size()
    need = sum(layer.weight.numel() for layer in layers.values()) * size * copies
    free = memory.available(device)
    if fsdp or not need or free is None or need <= free // 2:
        return "float", None
    return "int8", (f"note: the frozen base would take {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} of "
                    f"the {free / 2**30:.1f} GiB available, so it is stored in int8 (--base-precision auto; "
                    "--base-precision float keeps it)")


def agreed(model: nn.Module, device: torch.device, dtype: torch.dtype, fsdp: bool) -> tuple[str, str | None]:
    """`choose("auto", ...)` made the same in every training process: each holds its own copy
    of the base, so one that needs int8 to fit decides for all (one number, all-reduced); on
    one CPU the local processes share its memory, so the base counts once per process there."""
    from . import distributed

    copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed.launched() and device.type == "cpu" else 1
    chosen, note = choose("auto", model, device, dtype, fsdp, copies)
    if distributed.world_size() > 1:
        wanted = chosen == "int8"
        chosen = "int8" if distributed.all_sum([float(wanted)], device)[0] > 0 else "float"
        if chosen == "int8" and not wanted:
            note = ("note: another training process has too little memory for the float base, so every one stores it "
                    "in int8 (--base-precision auto; --base-precision float keeps it)")
    return chosen, note


def _frozen_linear(model: nn.Module) -> dict:
    """The layers an int8 base stores in int8: frozen nn.Linear inside the decoder blocks."""
    from .methods.targets import linear_layers

    return {name: layer for name, layer in linear_layers(model).items()
            if type(layer) is nn.Linear and not layer.weight.requires_grad}


def native_int8(device: torch.device) -> bool:
    """Does `device` multiply int8 matrices natively (CUDA; AVX-512 VNNI or AMX on a CPU)?"""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "amx_int8" in flags


def int8_note(device: torch.device) -> str | None:
    if native_int8(device):
        return None
    return (f"note: this {device.type.upper()} has no int8 dot-product instructions (AVX-512 VNNI / AMX), so the int8 "
            "base multiplies its int8 values as fp32 here: same numbers, half the base memory, no speed-up")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x (M, K) -> (xq int8 (M, K), scale fp32 (M, 1)), x ≈ scale · xq."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


@torch.library.custom_op("peftlab::int8_mm", mutates_args=())
def int8_mm(a: torch.Tensor, b: torch.Tensor, kernel: str) -> torch.Tensor:
    """a (M, K) int8 · b (K, N) int8 -> (M, N) fp32, the exact int32 products' sums.

    One opaque op for torch.compile: the quantization around it still fuses, but the compiler
    cannot see the fp32 kernel's float copy of the weight, so it can neither keep that copy
    for backward (4 bytes per base weight) nor share it between the forward and backward GEMMs."""
    if kernel == "int_mm" and a.device.type == "cuda":
        # cuBLASLt's int8 GEMM wants M > 16, K and N multiples of 8, and b column-major
        if a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0:
            return int_mm(a, b if b.stride(0) == 1 else b.t().contiguous().t()).float()
    elif kernel == "int_mm":
        return int_mm(a, b).float()
    return a.float() @ b.float()


@int8_mm.register_fake
def _(a, b, kernel):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


class Int8MatMul(torch.autograd.Function):
    """y = x · (Wq · diag(sw))ᵀ with x quantized per token, plus the outlier channels' fp32
    product; backward gives dx only."""

    @staticmethod
    def forward(ctx, x, qweight, wscale, outliers, outlier_weight, kernel):
        # x (..., in) · qweight (out, in) int8 · wscale (out,) fp32, plus the fp32 columns
        # outlier_weight (out, k) of the input channels `outliers` (k,) -> (..., out) in x's dtype
        ctx.save_for_backward(qweight, wscale, outliers, outlier_weight)
        ctx.kernel, ctx.dtype = kernel, x.dtype
        x2 = x.reshape(-1, x.shape[-1]).float()
        xq, sx = quantize_rows(x2.index_fill(1, outliers, 0.0))  # the per-token scale without them
        with torch.autocast(x.device.type, enabled=False):  # the outlier columns' product stays fp32
            wide = x2[:, outliers] @ outlier_weight.t()  # (M, k) · (k, out)
        y = int8_mm(xq, qweight.t(), kernel) * sx * wscale + wide
        return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        qweight, wscale, outliers, outlier_weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        gq, sg = quantize_rows(dy2 * wscale)  # fold W's per-output scales into dy
        dx = int8_mm(gq, qweight, ctx.kernel) * sg  # (M, out) · (out, in): zero in the outlier columns
        with torch.autocast(dy.device.type, enabled=False):
            wide = dy2 @ outlier_weight  # (M, out) · (out, k), fp32
        dx = dx.index_copy(1, outliers, wide)
        return dx.to(ctx.dtype).reshape(*dy.shape[:-1], qweight.shape[1]), None, None, None, None, None


class Int8Linear(nn.Linear):
    """A frozen nn.Linear whose weight lives in the buffers `qweight` (out, in) int8 and `wscale`
    (out,) fp32, except the columns `outliers` (k,) which `outlier_weight` (out, k) holds in fp32.
    Made from an nn.Linear in place by `to_int8`, never constructed."""

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) fp32 weight: a fresh tensor, so writing into it changes nothing."""
        return (self.qweight.float() * self.wscale[:, None]).index_copy(1, self.outliers, self.outlier_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # like nn.Linear under autocast: compute dtype out
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = Int8MatMul.apply(x, self.qweight, self.wscale, self.outliers, self.outlier_weight, self.kernel)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int8 ({self.kernel})"


def to_int8(linear: nn.Linear, kernel: str, x_range: torch.Tensor | None = None) -> Int8Linear:
    """Turn a frozen nn.Linear into an Int8Linear in place (same object) and return it;
    `x_range` (in,): the largest |input| per channel seen in calibration, whose OUTLIERS widest
    channels stay fp32 (None: none do)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}")
    if linear.weight.requires_grad:
        raise UserError("only frozen linear layers can be stored in int8; a trained weight keeps its precision")
    w = linear.weight.detach().float()
    k = min(OUTLIERS, w.shape[1]) if x_range is not None else 0
    outliers = x_range.topk(k).indices.sort().values if k else torch.zeros(0, dtype=torch.long, device=w.device)
    outlier_weight = w[:, outliers].clone()  # (out, k)
    w = w.index_fill(1, outliers, 0.0)  # their columns leave the int8 weight and its scales
    wscale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
    qweight = torch.round(w / wscale[:, None]).clamp_(-127, 127).to(torch.int8)
    del linear.weight
    linear.__class__ = Int8Linear
    linear.register_buffer("qweight", qweight)
    linear.register_buffer("wscale", wscale)
    linear.register_buffer("outliers", outliers)
    linear.register_buffer("outlier_weight", outlier_weight)
    linear.kernel = kernel
    return linear


def to_float(linear: Int8Linear) -> nn.Linear:
    """Undo `to_int8` in place: a plain nn.Linear holding the dequantized fp32 weight (frozen)."""
    w = linear.weight
    del linear.qweight, linear.wscale, linear.outliers, linear.outlier_weight, linear.kernel
    linear.__class__ = nn.Linear
    linear.weight = nn.Parameter(w, requires_grad=False)
    return linear


def is_int8(module: nn.Module) -> bool:
    return isinstance(module, Int8Linear)


def quantize_frozen(model: nn.Module, device: torch.device, calibration: torch.Tensor | None = None) -> int:
    """Store every frozen nn.Linear inside the decoder blocks in int8; returns how many.
    `calibration` (rows, T) token ids: the layers' inputs on its first CALIBRATION_TOKENS pick
    each layer's outlier channels (None: none).

    Trained linear layers (full and freeze strategies), GPT-2's Conv1D layers and everything
    outside the blocks (embeddings, the output layer) keep their precision. On the CPU, freed
    tensors go back to the system from here on (`memory.unmap_freed`), or the saving would not
    reach the run's peak."""
    kernel = "int_mm" if native_int8(device) else "float"
    if device.type == "cpu":  # before calibration: its temporaries would leave the first holes
        memory.unmap_freed()
    frozen = _frozen_linear(model)
    ranges = {}
    if calibration is not None:
        ids = calibration[:max(1, CALIBRATION_TOKENS // calibration.shape[1])].to(device)
        ranges = input_ranges(model, frozen, ids)
    for name, layer in frozen.items():
        to_int8(layer, kernel, ranges.get(name))
    _own_memory(model)
    return len(frozen)


@torch.no_grad()
def input_ranges(model: nn.Module, layers: dict, ids: torch.Tensor) -> dict:
    """The largest |input| per channel (in,) of each layer in `layers` (name -> nn.Linear)
    while the decoder runs on `ids` (rows, T) in the weights' own precision, dropout off
    (methods/calibration.py's hooked forward, as LoRA's data-driven inits use). The output
    layer is not run: its logits made the calibration's resident peak 340 MB higher."""
    from .methods.calibration import run_hooked

    ranges = {}

    def seen(name, x, keep):
        r = x[keep].abs().amax(dim=0).float()  # (in,) over the tokens that count
        ranges[name] = torch.maximum(ranges[name], r) if name in ranges else r

    step = max(1, 256 // ids.shape[1])  # ≤ 256 tokens at a time: 4 × 256 at once raised the peak by 400 MB
    for chunk in ids.split(step):
        run_hooked(model, layers, {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}, seen, model.base_model)
    return ranges


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """The loader may map the weight file into memory (safetensors): one mapping shared by every
    tensor read from it, released only when the last of them is gone. Give the remaining
    tensors their own memory, so the float weights just quantized are really freed (measured
    on SmolLM2: resident 875 MB → 575 MB). The int8 layers' buffers are new already: copying
    them too raised the peak by their size."""
    seen = {id(t) for m in model.modules() if is_int8(m) for t in m.buffers(recurse=False)}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.device.type == "cpu":
            seen.add(id(t))
            t.data = t.data.clone()


def int8_bytes(model: nn.Module) -> int:
    """Bytes the int8 layers' weights, scales and fp32 outlier columns occupy."""
    return sum(t.numel() * t.element_size() for m in model.modules() if is_int8(m)
               for t in (m.qweight, m.wscale, m.outliers, m.outlier_weight))
