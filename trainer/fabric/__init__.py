"""Fabricated models: seeded random weights of a flavour's real shapes, in the layouts users have
(`python -m trainer fabricate`). make.py plans and writes them; layouts.py, models.py, stream.py and
tokenizers.py are its parts. This file imports nothing, so a part never loads the whole package.
"""
