"""What LoHa and LoKr (the LyCORIS family, peft's LycorisConfig) share: their options, the
per-layer plan, the config fields both write and read, and their peft config keys."""

from ..components import is_conv1d
from ..errors import UserError
from ..spec import Option, Step
from .lowrank import layer_rank_alpha, read_patterns
from .registry import peft_fields, resolved
from .targets import EXCLUDE_HELP, REGEX_HELP, TARGETS_HELP, linear_layers, peft_targets, pick_targets, target_options

LYCORIS_FIELDS = peft_fields("r alpha rank_dropout module_dropout use_effective_conv2d target_modules exclude_modules",
                             "init_weights layers_to_transform layers_pattern rank_pattern alpha_pattern modules_to_save")


def lycoris_plan(model, method, r, alpha, targets, target_regex, layers, rank_pattern, alpha_pattern, exclude=None) -> list:
    """[(path, layer, rank, alpha)] for every target, every option checked (nothing allocated)."""
    ranks = read_patterns(rank_pattern, f"{method}: rank_pattern", "int")
    alphas = read_patterns(alpha_pattern, f"{method}: alpha_pattern", "float", 0)
    plan = []
    for path, layer in pick_targets(model, targets, target_regex, layers, method, exclude).items():
        plan.append((path, layer, *layer_rank_alpha(method, path, r, alpha, ranks, alphas)))
    return plan


LYCORIS_OPTIONS = dict(
    r=Option(8, "int", help="rank", low=1),
    alpha=Option(8.0, "float", help="scale numerator: ΔW is multiplied by alpha/r (peft's default 8)", low=0),
    targets=Option(None, "list", help=TARGETS_HELP),
    target_regex=Option(None, "regex", help=REGEX_HELP),
    exclude=Option(None, "regex", help=EXCLUDE_HELP),
    layers=Option(None, help="blocks: A-B, or indices joined with +"),
    rank_pattern=Option((), "patterns", help="per-layer ranks: PATTERN=R joined with +", of="int"),
    alpha_pattern=Option((), "patterns", help="per-layer alphas: PATTERN=ALPHA joined with +", low=0),
    name=Option("default", help="adapter name"),
    seed=Option(0, "int", low=0),
)


def lycoris_fields(model, step: Step, hosts: dict, peft_type: str) -> dict:
    """The fields LoHaConfig and LoKrConfig share."""
    o = resolved(step)
    split = lambda items, kind: {k: kind(v) for k, _, v in (i.rpartition("=") for i in items)}  # noqa: E731
    return {"peft_type": peft_type, "r": o["r"], "alpha": o["alpha"], **peft_targets(model, hosts),
            "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "exclude_modules": None,
            "init_weights": True, "rank_pattern": split(o["rank_pattern"], int),
            "alpha_pattern": split(o["alpha_pattern"], float)}


def linear_only(step, model) -> bool:
    """peft's LoHa and LoKr take nn.Linear only: a model with Conv1D layers (GPT-2) saves in
    peftlab's own format instead, which peft would otherwise be unable to load."""
    return not any(is_conv1d(m) for m in linear_layers(model).values())


def read_lycoris(config: dict, where) -> dict:
    """Our options from the fields LoHaConfig and LoKrConfig share; refuse what we cannot honour.
    init_weights is not read: the saved tensors replace the init. use_effective_conv2d only
    concerns conv layers, which peftlab does not target."""
    for key in ("rank_dropout", "module_dropout"):
        if config.get(key) not in (None, 0, 0.0):
            raise UserError(f"{where}: peft option {key}={config[key]!r} is not supported by peftlab (only 0)")
    options = {"r": config.get("r", 8), "alpha": config.get("alpha", 8)}
    for key in ("rank_pattern", "alpha_pattern"):
        items = []
        for k, v in (config.get(key) or {}).items():
            if "+" in k or "," in k:
                raise UserError(f"{where}: {key} key '{k}' holds '+' or ',', which a peftlab strategy cannot carry")
            items.append(f"{k}={v}")
        options[key] = tuple(items)
    return options | target_options(config, where)
