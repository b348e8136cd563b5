"""Placeholder until the CUDA bindings land."""


def is_cuda_array(obj):
    return hasattr(obj, "__cuda_array_interface__")
