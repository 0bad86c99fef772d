"""pytest-benchmark suites (``pytest benchmarks --benchmark-only``) and their report (``ip2p bench report``)."""
