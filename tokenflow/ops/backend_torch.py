"""The `torch` backend: the plain-PyTorch reference, valid for every input the validators accept."""
from tokenflow.ops import reference
from tokenflow.ops.backends import Backend, register


class TorchBackend(Backend):
    name = "torch"
    ops = ("extended_attention", "propagate", "cosine_argmax")

    extended_attention = staticmethod(reference.extended_attention)
    propagate = staticmethod(reference.propagate)
    cosine_argmax = staticmethod(reference.cosine_argmax)


register(TorchBackend())
