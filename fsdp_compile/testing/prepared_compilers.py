"""Importing this module prepares this process's compilers once
(``torch_private.prepare_compilers_once``): the test suite's rank fork server imports it
(``tests/conftest.py``), so that every forked rank starts with Inductor's lazy imports, CPU
probe and pattern registrations done instead of spending seconds of its first compile on them.
"""
from fsdp_compile import torch_private

torch_private.prepare_compilers_once()
