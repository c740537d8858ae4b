"""
Several optimizers stepping as one (--optimizer muon: Muon for the blocks' matrices, AdamW for the
rest), so that the training loop, GradScaler and checkpoints see a single optimizer.
"""


class Combined:
    """The optimizers `parts` (name: optimizer) as one: their param groups in order, one step, one
    zero_grad, and one state dict of the parts' ({name: its state dict}). GradScaler takes it as it
    takes any optimizer: it unscales the gradients of every group, and steps only where they are
    finite."""

    def __init__(self, **parts):
        self.parts = parts

    @property
    def param_groups(self):
        return [group for opt in self.parts.values() for group in opt.param_groups]

    def step(self, closure=None):
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state):
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])
