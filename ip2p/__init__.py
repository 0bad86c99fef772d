"""The ``ip2p`` command: assembles the commands each part of the project owns (see ``ip2p.cli``)."""
