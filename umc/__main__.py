"""``python -m umc``: the umc command line. A rank of a ``--nproc`` launch runs the command line it was handed in
UMC_RANK_ARGV (``umc.launch``), which torchrun's own option parser never sees."""

import json
import os

from umc.cli import main
from umc.launch import ARGV

main(args=json.loads(os.environ[ARGV]) if ARGV in os.environ else None, prog_name="umc")
