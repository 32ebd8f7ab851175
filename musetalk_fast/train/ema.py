"""Exponential moving average of the trainable weights (the weights evaluated and shipped)."""
import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weight after each optimizer step, with the decay warmed
    up as min(decay, (1 + n) / (10 + n)) over the first updates so early weights do not linger.
    Buffers (e.g. statistics) are copied as they are. Transformer Engine's fp8 "_extra_state" entries
    (scaling history of --fp8 linears, not weights) are not averaged or copied."""

    def __init__(self, model, decay=0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1) (got {decay})")
        self.decay, self.updates = decay, 0
        self.shadow = {name: value.detach().clone().float() if value.is_floating_point() else value.detach().clone()
                       for name, value in _weights(model).items()}

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = dict(model.named_parameters())
        for name, value in _weights(model).items():
            shadow = self.shadow[name]
            if name in params and params[name].requires_grad and value.is_floating_point():
                shadow.lerp_(value.float(), 1 - decay)
            else:
                shadow.copy_(value)

    @torch.no_grad()
    def copy_to(self, model):
        """Load the averaged weights into `model` (e.g. a copy used for evaluation)."""
        own = _weights(model)
        if own.keys() != self.shadow.keys():
            raise ValueError(f"the model's weights differ from the averaged ones: "
                             f"{sorted(own.keys() ^ self.shadow.keys())[:4]}")
        model.load_state_dict({name: value.to(own[name].dtype) for name, value in self.shadow.items()}, strict=False)

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {name: value.clone() for name, value in state["shadow"].items()}


def _weights(model):
    """model.state_dict() without Transformer Engine's "_extra_state" entries."""
    return {name: value for name, value in model.state_dict().items() if not name.endswith("_extra_state")}
