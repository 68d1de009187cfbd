import sys

from megatron_lsh.projection.cli import main

sys.exit(main())
