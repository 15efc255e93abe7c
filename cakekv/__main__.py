"""``python -m cakekv``: the ``cakekv`` command, for launchers that start a module (``accelerate launch -m cakekv``,
``torchrun -m cakekv``)."""
import sys

from .cli import main

sys.exit(main())
