"""``python -m ip2p``, the same as the ``ip2p`` command (``accelerate launch -m ip2p train ...``)."""
import sys

from ip2p.cli import main

sys.exit(main())
