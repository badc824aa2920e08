"""Gradual unfreezing: each named component becomes trainable at its own step.

    schedule:mlp=0,norm=0,attention=100   -> MLP and norms from the start, attention from step 100

The step returns a `Training` whose `unfreeze_at` the training loop reads: it hands newly
trainable parameters to the optimizer at their step (a single process: the set of trained
tensors changes mid-run).
"""

from ..components import COMPONENTS, select, unfreeze
from ..errors import UserError
from ..spec import Option
from .protocol import Training
from .registry import register


class Unfreeze(Training):
    processes = "one"

    def __init__(self, plan: dict):
        self.unfreeze_at = plan  # step -> [parameter names]


@register("schedule", examples=("schedule:mlp=0,attention=2",), **{c: Option(None, "int", help=f"step at which {c} starts training", low=0) for c in COMPONENTS})
def schedule(model, **starts):
    """Unfreeze each component at its own step."""
    plan = {}
    for component, step in starts.items():
        if step is None:
            continue
        if step < 0:
            raise UserError(f"schedule: {component}={step} must be a step >= 0")
        names = select(model, (component,))
        if not names:
            raise UserError(f"schedule: this model has no '{component}' parameters")
        if step == 0:
            unfreeze(model, names)
        else:
            plan.setdefault(step, []).extend(names)
    if not plan and not any(v == 0 for v in starts.values()):
        raise UserError("schedule: give each component its start step, e.g. schedule:mlp=0,attention=100")
    return Unfreeze(plan)
