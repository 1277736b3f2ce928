"""The fused LIF layer on generated Triton kernels (work in progress: not yet available)."""

from snnopt.errors import InvalidArgumentError


def lif_triton_op(*args, **kwargs):
    raise InvalidArgumentError("backend: 'triton' is not available yet in this build; use backend='cpu'")
