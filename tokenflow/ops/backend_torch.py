"""The `torch` backend: the plain-PyTorch reference, valid for every input the validators accept."""
from tokenflow.ops import reference
from tokenflow.ops.backends import Backend, register
from tokenflow.ops.capabilities import OPS, Capabilities


class TorchBackend(Backend):
    name = "torch"
    caps = Capabilities(ops=OPS)  # any device, every float dtype, no limits

    extended_attention = staticmethod(reference.extended_attention)
    propagate = staticmethod(reference.propagate)
    cosine_argmax = staticmethod(reference.cosine_argmax)


register(TorchBackend())
