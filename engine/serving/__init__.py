"""The HTTP edit service: a thin layer over one EditPipeline (``ip2p serve``), and the same API on Ray Serve."""
