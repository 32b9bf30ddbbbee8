import sys

from vfm_align.cli import main

sys.exit(main())
