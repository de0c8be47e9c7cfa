"""Diff-Privacy: diffusion-based face anonymization and visual identity hiding with recovery keys.

Imports diffusers and transformers; :mod:`anonloader` imports this package only when
``method="diffprivacy"`` is asked for.
"""
