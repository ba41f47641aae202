"""The client side of GenX fits: settings, the fit cache, outputs and plots (``fits``), and the fit
job that submits models and collects results (``job``). Satellites run the fits (``satellites.genx_task``).
"""
