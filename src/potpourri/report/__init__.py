"""Reports: ``report.html`` pages, plots and image grids.

Contract: imports core/ only (and plotting libraries); every folder above may import it.
"""
