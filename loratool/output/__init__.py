"""What every writing command shares: output units (canonical targets, kind, alpha, one piece per
tensor), planning them for a layout, factors computed in a file's dtype, and the writer."""
