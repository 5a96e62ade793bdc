"""What every writing command shares beside the output units (`loratool/units.py`): planning them
for a layout, factors computed in a file's dtype, and the writer."""
