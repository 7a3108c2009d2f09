"""Paper reproductions: ``registry.EXPERIMENTS`` names one ``run(quick, out) -> Run`` per paper, one file each,
plus the end-to-end demo.

Contract: may import every folder below cli/ and app/; nothing below imports papers/.
"""
