"""Implementations of :class:`fwdecomp.interface.DecompositionInterface`.

Each backend module installs itself when imported (``Registerer``):

- :mod:`fwdecomp.backends.eager` runs the registered Python decomposition.
"""
