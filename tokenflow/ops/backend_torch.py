"""The `torch` backend: the plain-PyTorch reference, valid for every input the validators accept."""
from tokenflow.ops import reference
from tokenflow.ops.backends import register


class TorchBackend:
    name = "torch"
    ops = ("extended_attention", "propagate", "cosine_argmax")

    def why_not(self, op, **inputs):
        return None

    extended_attention = staticmethod(reference.extended_attention)
    propagate = staticmethod(reference.propagate)
    cosine_argmax = staticmethod(reference.cosine_argmax)


register(TorchBackend())
