"""Triton kernels of pygeo, one file per op (kernels + host launchers), installed as pygeo.triton_kernels.

Importing a submodule imports triton; pygeo imports these lazily, only when the triton backend is chosen.
"""
