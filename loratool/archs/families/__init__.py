"""Model families, one module each, that `python -m loratool.archs.generate` turns into tables.

A family module (`sd1.py`, `flux1.py`, ...) declares everything that is true of that family and
nothing else: its published configs, its single-file naming rules, its prefixes and metadata hints,
and where it sorts among the others. It exposes one `FAMILY` object; the generator finds the modules
by listing this package, so adding a family never means editing a list. Modules whose names start
with `_` are pieces several families share (the LDM UNet, CLIP, T5, the row builder), not families.

Nothing here is imported at loratool run time: run time reads only the generated tables.
"""
